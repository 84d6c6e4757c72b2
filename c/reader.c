/* reader.c: the guest view of a layer and its chain (FORMAT.md section 5,
 * F-MEAN-001 to F-MEAN-004), and the `dump` command. */
#include "lamina.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The current map of region r of a Lamina layer, through a one-region cache. */
int load_map(lc_layer *l, uint64_t r)
{
    if (l->cached_region == (int64_t)r)
        return 0;
    map_free(&l->cached);
    l->cached_region = -1;
    int rc = map_read_both(l->fd, l->file_size, &l->geo, l->root->image_uuid, layer_shared(l), r,
                           &l->cached);
    if (rc)
        return rc;
    if (l->cached.state == MAP_NO_VALID_COPY)
        return lc_fail(LC_CORRUPT, "%s: region %llu: neither map copy is valid (NoValidCopy): A: %s; B: %s",
                       l->path, (unsigned long long)r, l->cached.copy[0].why, l->cached.copy[1].why);
    l->cached_region = (int64_t)r;
    return 0;
}

static int is_present(const lc_layer *l, uint64_t region_sector)
{
    if (l->cached.state != MAP_CURRENT)
        return 0;
    return map_present(l->cached.copy[l->cached.current].buf, region_sector);
}

/* F-SHARE-003 and F-SHARE-007: store cluster s exists (s < ceil(virtual_size
 * / cluster_size) of the store: a partial last cluster counts, its bytes past
 * the virtual size read as zero) and is allocated (has a present sector);
 * else the reference is SharedReferenceError, never a read of something else. */
int store_cluster_usable(lc_layer *store, uint64_t s)
{
    const lc_geometry *g = &store->geo;
    uint64_t clusters = (store->root->virtual_size + g->cluster_size - 1) / g->cluster_size;
    if (s >= clusters)
        return lc_fail(LC_CORRUPT, "%s: store cluster %llu is past the store's end (%llu clusters) (SharedReferenceError)",
                       store->path, (unsigned long long)s, (unsigned long long)clusters);
    int rc = load_map(store, s / CLUSTERS_PER_REGION);
    if (rc)
        return rc;
    uint64_t spc = g->cluster_size / SECTOR_SIZE;
    uint64_t first = (s % CLUSTERS_PER_REGION) * spc;
    if (store->cached.state == MAP_CURRENT) {
        const uint8_t *map = store->cached.copy[store->cached.current].buf;
        for (uint64_t k = 0; k < spc; k++)
            if (map_present(map, first + k))
                return 0;
    }
    return lc_fail(LC_CORRUPT, "%s: store cluster %llu is not allocated (SharedReferenceError)", store->path,
                   (unsigned long long)s);
}

/* The reference of the current map of `l` for the data cluster holding the
 * region-relative offset `roff` (0: local). */
static uint64_t shared_ref_at(const lc_layer *l, uint64_t roff)
{
    if (l->cached.state != MAP_CURRENT)
        return 0;
    return map_shared_ref(&l->cached.copy[l->cached.current], &l->geo, roff / l->geo.cluster_size);
}

/* Fill buf with the guest bytes [off, off + len) of `l`'s view (F-MEAN-002).
 * *touched is set when any byte came from a file (else buf is all zero). */
int read_view(lc_layer *l, uint64_t off, uint64_t len, uint8_t *buf, int *touched)
{
    if (l->kind == BASE_RAW) {
        if (pread_full(l->fd, buf, len, off) < 0)
            return lc_fail(LC_ERROR, "%s: read error: %s", l->path, strerror(errno));
        *touched = 1;
        return 0;
    }
    const lc_geometry *g = &l->geo;
    uint64_t vs = l->root->virtual_size;
    uint64_t end = off + len;
    while (off < end) {
        if (off >= vs) {
            memset(buf, 0, end - off); /* nothing of a layer lies past its size */
            return 0;
        }
        uint64_t r = off / g->region_span;
        uint64_t region_end = (r + 1) * g->region_span;
        uint64_t stop = end < region_end ? end : region_end;
        if (stop > vs)
            stop = vs;
        int rc = load_map(l, r);
        if (rc)
            return rc;
        uint64_t file_base = g->first_region_offset + r * g->region_stride + g->cluster_size;
        while (off < stop) {
            uint64_t sector = (off % g->region_span) / SECTOR_SIZE;
            int present = is_present(l, sector);
            uint64_t ref = present ? shared_ref_at(l, off % g->region_span) : 0;
            uint64_t e = (off / SECTOR_SIZE + 1) * SECTOR_SIZE;
            uint64_t cluster_end = (off / g->cluster_size + 1) * g->cluster_size;
            /* a run of present sectors of a shared cluster ends with the cluster;
             * one of local clusters goes on while the clusters stay local */
            while (e < stop && is_present(l, (e % g->region_span) / SECTOR_SIZE) == present &&
                   (ref ? e < cluster_end : !present || shared_ref_at(l, e % g->region_span) == 0))
                e += SECTOR_SIZE;
            if (e > stop)
                e = stop;
            uint64_t n = e - off;
            if (present && ref) {
                lc_layer *store = l->store;
                if (!store)
                    return lc_fail(LC_CORRUPT, "%s: a shared cluster without a usable store (SharedReferenceError)",
                                   l->path);
                if ((rc = store_cluster_usable(store, ref - 1)))
                    return rc;
                rc = read_view(store, (ref - 1) * g->cluster_size + off % g->cluster_size, n, buf, touched);
                if (rc)
                    return rc;
            } else if (present) {
                if (pread_full(l->fd, buf, n, file_base + off % g->region_span) < 0)
                    return lc_fail(LC_ERROR, "%s: read error: %s", l->path, strerror(errno));
                *touched = 1;
            } else if (l->base && off < l->visible) {
                uint64_t m = e < l->visible ? n : l->visible - off;
                rc = read_view(l->base, off, m, buf, touched);
                if (rc)
                    return rc;
                /* the base may have moved the cache of a shared file: reload */
                if (l->cached_region != (int64_t)r && (rc = load_map(l, r)))
                    return rc;
                memset(buf + m, 0, n - m);
            } else {
                memset(buf, 0, n);
            }
            buf += n;
            off = e;
        }
    }
    return 0;
}

/* The lowest guest offset at or after `off` where the view of `l` may hold
 * a non-zero byte: every region of a file without a data extent is never
 * written (all absent), so a sparse dump skips it without reading. */
static uint64_t view_next_data(lc_layer *l, uint64_t off)
{
    if (l->kind == BASE_RAW) {
        off_t d = lseek(l->fd, (off_t)off, SEEK_DATA);
        if (d < 0)
            return errno == ENXIO ? UINT64_MAX : off;
        return (uint64_t)d;
    }
    const lc_geometry *g = &l->geo;
    uint64_t own = UINT64_MAX, below = UINT64_MAX;
    if (off >= l->root->virtual_size)
        return UINT64_MAX;
    uint64_t r = off / g->region_span;
    off_t d = lseek(l->fd, (off_t)(g->first_region_offset + r * g->region_stride), SEEK_DATA);
    if (d < 0 && errno != ENXIO) {
        own = off;
    } else if (d >= 0 && (uint64_t)d >= g->first_region_offset) {
        uint64_t rd = ((uint64_t)d - g->first_region_offset) / g->region_stride;
        if (rd < g->num_regions)
            own = rd * g->region_span > off ? rd * g->region_span : off;
    }
    if (l->base && off < l->visible) {
        below = view_next_data(l->base, off);
        if (below >= l->visible)
            below = UINT64_MAX;
    }
    return own < below ? own : below;
}

/* F-SNAP-003: TEXT names an image when such a file exists or it holds no @;
 * otherwise IMAGE@SNAP, split at the last @. */
static int parse_target(const char *text, char *image, size_t ilen, const char **snap)
{
    struct stat st;
    const char *at = strrchr(text, '@');
    *snap = NULL;
    if (!at || stat(text, &st) == 0) {
        if (strlen(text) >= ilen)
            return lc_fail(LC_ERROR, "path too long");
        strcpy(image, text);
        return 0;
    }
    if ((size_t)(at - text) >= ilen)
        return lc_fail(LC_ERROR, "path too long");
    memcpy(image, text, (size_t)(at - text));
    image[at - text] = 0;
    *snap = at + 1;
    return 0;
}

static int open_view(const char *target, lc_layer **top_out, lc_layer **view_out)
{
    char image[4096], image_top[4096];
    const char *snap;
    *top_out = *view_out = NULL;
    int rc = parse_target(target, image, sizeof image, &snap);
    if (rc)
        return rc;
    if ((rc = image_of(image, image_top, sizeof image_top)))
        return rc;
    rc = layer_open(image, 1, image_top, BASE_LAMINA, top_out);
    struct stat st;
    if (rc == LC_ERROR && !lc_lock_failed && lstat(image, &st) == 0)
        rc = LC_CORRUPT; /* the image exists but is no file a reader may use */
    if (rc)
        return rc;
    if (!snap) {
        *view_out = *top_out;
    } else {
        /* The top is opened as an image, its chain included, before its table
         * is used (as the reference does; FORMAT.md leaves this open). */
        if ((rc = chain_open(*top_out)) || (rc = chain_attach_stores(*top_out)))
            return rc;
        int idx = find_snapshot((*top_out)->root, snap);
        if (idx < 0)
            return lc_fail(LC_ERROR, "%s: no snapshot named %s (SnapshotNotFound)", image, snap);
#ifdef BROKEN_SNAPSHOT_LAYER
        /* Defect: reads the layer above the snapshot's (the next one, or the top). */
        if ((uint32_t)idx + 1 >= (*top_out)->root->num_snapshots) {
            *view_out = *top_out; /* its chain is open already */
            return 0;
        }
        idx++;
#endif
        rc = open_snapshot_layer(image_top, (*top_out)->root, idx, view_out);
        if (rc)
            return rc;
    }
    if ((rc = chain_open(*view_out)))
        return rc;
    return chain_attach_stores(*view_out);
}

#define DUMP_CHUNK (1u << 20)

int cmd_dump(const char *target, const char *out)
{
    lc_layer *top, *view;
    int rc = open_view(target, &top, &view);
    if (rc) {
        if (view && view != top)
            layer_close_chain(view);
        layer_close_chain(top);
        store_close_all();
        return rc;
    }
    uint8_t *buf = malloc(DUMP_CHUNK);
    int fd = open(out, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644); /* a new file */
    uint64_t size = view->root->virtual_size;
    if (!buf || fd < 0) {
        rc = lc_fail(LC_ERROR, "%s: cannot create: %s", out, strerror(errno));
        goto done;
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        rc = lc_fail(LC_ERROR, "%s: cannot set its length: %s", out, strerror(errno));
        goto done;
    }
    for (uint64_t off = 0, n; off < size; off += n) {
        uint64_t next = view_next_data(view, off);
        if (next >= size)
            break;
        if (next > off)
            off = next / SECTOR_SIZE * SECTOR_SIZE;
        n = size - off < DUMP_CHUNK ? size - off : DUMP_CHUNK;
        int touched = 0;
        if ((rc = read_view(view, off, n, buf, &touched)))
            goto done;
        if (!touched || all_zero(buf, n))
            continue;
        for (uint64_t w = 0; w < n;) {
            ssize_t k = pwrite(fd, buf + w, n - w, (off_t)(off + w));
            if (k < 0) {
                rc = lc_fail(LC_ERROR, "%s: write error: %s", out, strerror(errno));
                goto done;
            }
            w += (uint64_t)k;
        }
    }
    if (fsync(fd) < 0 && errno != EINVAL)
        rc = lc_fail(LC_ERROR, "%s: fsync: %s", out, strerror(errno));
done:
    if (fd >= 0 && close(fd) < 0 && !rc)
        rc = lc_fail(LC_ERROR, "%s: close: %s", out, strerror(errno));
    if (rc && fd >= 0)
        unlink(out);
    free(buf);
    if (view != top)
        layer_close_chain(view);
    layer_close_chain(top);
    store_close_all();
    return rc;
}
