/* check.c: the `check` command, FORMAT.md section 8 (I1-I8, F-CHECK-001 to
 * F-CHECK-003) over the whole tree of section 9 (T1-T4).  Read-only: every
 * file is opened O_RDONLY. */
#include "lamina.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef enum { CL_PENDING, CL_LEAK, CL_DEGRADED, CL_CORRUPT } finding_class;

static int found[4];
static char locked_store[1024]; /* a store a writer holds: the check cannot complete */

/* Print one finding, `kind: message`, and count its class. */
static void finding(finding_class c, const char *kind, const char *label, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void finding(finding_class c, const char *kind, const char *label, const char *fmt, ...)
{
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("%s: %s%s%s\n", kind, label ? label : "", label ? ": " : "", msg);
    found[c]++;
}

/* First non-zero byte of [off, off + len) within the file, skipping holes.
 * Returns 1 and sets *where when there is one, 0 when all zero, -1 on error. */
static int first_nonzero(int fd, uint64_t file_size, uint64_t off, uint64_t len, uint64_t *where)
{
    static uint8_t buf[1 << 16];
    uint64_t end = off + len;
    if (end > file_size)
        end = file_size;
    while (off < end) {
        off_t d = lseek(fd, (off_t)off, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO)
                return 0;
            d = (off_t)off; /* no SEEK_DATA here: read everything */
        }
        if ((uint64_t)d >= end)
            return 0;
        off = (uint64_t)d;
        off_t h = lseek(fd, (off_t)off, SEEK_HOLE);
        uint64_t data_end = h < 0 || (uint64_t)h > end ? end : (uint64_t)h;
        if (data_end <= off)
            data_end = end;
        while (off < data_end) {
            size_t n = data_end - off < sizeof buf ? (size_t)(data_end - off) : sizeof buf;
            if (pread_full(fd, buf, n, off) < 0)
                return -1;
            for (size_t i = 0; i < n; i++)
                if (buf[i]) {
                    *where = off + i;
                    return 1;
                }
            off += n;
        }
    }
    return 0;
}

/* Whether [off, off + len) of the file is one hole (or past its end). */
static int is_hole(const lc_layer *l, uint64_t off, uint64_t len)
{
    if (off >= l->file_size)
        return 1;
    off_t d = lseek(l->fd, (off_t)off, SEEK_DATA);
    if (d < 0)
        return errno == ENXIO;
    return (uint64_t)d >= off + len;
}

/* CRC32C of a cluster of zeros, computed once per cluster size. */
static uint32_t zero_cluster_crc(uint64_t cluster_size, uint8_t *scratch)
{
    static uint64_t size;
    static uint32_t crc;
    if (size != cluster_size) {
        memset(scratch, 0, cluster_size);
        crc = crc32c(0, scratch, cluster_size);
        size = cluster_size;
    }
    return crc;
}

/* Report a leak (or unflushed bytes) when [off, off + len) is not all zero. */
static void zero_span(const lc_layer *l, const char *label, uint64_t off, uint64_t len,
                      int listed, const char *what)
{
    uint64_t where;
    int rc = first_nonzero(l->fd, l->file_size, off, len, &where);
    if (rc < 0)
        finding(CL_CORRUPT, "leaked-bytes", label, "cannot read %s", what);
    else if (rc > 0 && listed)
        finding(CL_PENDING, "unflushed-bytes", label, "%s holds bytes (file offset %llu)", what,
                (unsigned long long)where);
    else if (rc > 0)
        finding(CL_LEAK, "leaked-bytes", label, "%s holds bytes (file offset %llu)", what,
                (unsigned long long)where);
}

static int is_listed(const lc_root *root, uint64_t r)
{
    for (uint32_t i = 0; i < root->num_intents; i++)
        if (root->intents[i] == r)
            return 1;
    return 0;
}

static void check_region(lc_layer *l, const char *label, uint64_t r, int listed, uint8_t *cluster)
{
    const lc_geometry *g = &l->geo;
    const lc_root *root = l->root;
    uint64_t start = g->first_region_offset + r * g->region_stride;
    uint64_t copy_off[2] = {start, start + (REGION_STRIDE_CLUSTERS - 1) * g->cluster_size};
    uint64_t data_off = start + g->cluster_size;
    char what[128];
    lc_maps maps;
    int shared = layer_shared(l);
    if (map_read_both(l->fd, l->file_size, g, root->image_uuid, shared, r, &maps)) {
        finding(CL_CORRUPT, "map-unrecoverable", label, "region %llu: %s", (unsigned long long)r,
                lc_errmsg);
        map_free(&maps);
        return;
    }
    for (int k = 0; k < 2; k++) {
        snprintf(what, sizeof what, "region %llu: map copy %c past its used length",
                 (unsigned long long)r, 'A' + k);
        /* F-MAP-006: in a layer that sets shared-clusters the table's place
         * follows `present` whether or not the copy carries it */
        uint64_t used = g->map_used + (shared ? SHARED_TABLE_SIZE : 0);
        zero_span(l, label, copy_off[k] + used, g->cluster_size - used, 0, what);
    }
    finding_class copy_class = listed ? CL_PENDING : CL_DEGRADED;
    if (maps.state == MAP_NO_VALID_COPY) {
        finding(CL_CORRUPT, "map-unrecoverable", label,
                "region %llu: neither map copy is valid: A: %s; B: %s", (unsigned long long)r,
                maps.copy[0].why, maps.copy[1].why);
        map_free(&maps);
        return;
    }
    if (maps.state == MAP_NEVER_WRITTEN) {
        for (int k = 0; k < 2; k++)
            if (!maps.copy[k].zeroed)
                finding(copy_class, "map-copy", label, "region %llu: map copy %c: %s",
                        (unsigned long long)r, 'A' + k, maps.copy[k].why);
        snprintf(what, sizeof what, "region %llu (never written): data clusters",
                 (unsigned long long)r);
        zero_span(l, label, data_off, CLUSTERS_PER_REGION * g->cluster_size, listed, what);
        map_free(&maps);
        return;
    }
    int other = 1 - maps.current;
    const uint8_t *map = maps.copy[maps.current].buf;
    if (maps.copy[other].status != COPY_VALID)
        finding(copy_class, "map-copy", label, "region %llu: map copy %c: %s",
                (unsigned long long)r, 'A' + other, maps.copy[other].why);
    else if (maps.other_stale)
        finding(copy_class, "map-copy", label, "region %llu: map copy %c is stale",
                (unsigned long long)r, 'A' + other);
    if (maps.copy[maps.current].generation == MAX_COUNTER)
        finding(CL_CORRUPT, "counter-exhausted", label, "region %llu: map generation is at MAX_COUNTER",
                (unsigned long long)r);
    uint64_t sectors = g->region_span / SECTOR_SIZE;
    uint64_t first_sector = r * sectors;
    uint64_t vs_sectors = root->virtual_size / SECTOR_SIZE;
    for (uint64_t k = 0; k < sectors; k++) {
        if (first_sector + k >= vs_sectors && map_present(map, k)) {
            finding(listed ? CL_PENDING : CL_CORRUPT, "map-invariant", label,
                    "region %llu: sector %llu at or past the virtual size is present",
                    (unsigned long long)r, (unsigned long long)(first_sector + k));
            break;
        }
    }
    uint64_t spc = g->cluster_size / SECTOR_SIZE;
    /* I5 and I6 judge the sectors a reader sees: a presence bit at or past
     * the virtual size is ignored (F-MAP-005), as the reference does. */
#define PRESENT(k) (first_sector + (k) < vs_sectors && map_present(map, (k)))
    int absent_bytes_reported = 0;
    for (uint64_t c = 0; c < CLUSTERS_PER_REGION; c++) {
        uint64_t coff = data_off + c * g->cluster_size;
        uint64_t guest = r * g->region_span + c * g->cluster_size;
        int any_present = 0;
        uint32_t crc;
        uint64_t ref = map_shared_ref(&maps.copy[maps.current], g, c);
        if (ref) {
            /* F-SHARE-004: follow the reference; I5 over the store's bytes,
             * I6 for the local place, which must be a hole */
            for (uint64_t s = 0; s < spc && !any_present; s++)
                any_present = PRESENT(c * spc + s);
            uint64_t where;
            int nz = first_nonzero(l->fd, l->file_size, coff, g->cluster_size, &where);
            if (nz != 0 && !absent_bytes_reported) {
                absent_bytes_reported = 1;
                finding(listed ? CL_PENDING : CL_LEAK, listed ? "unflushed-bytes" : "leaked-bytes", label,
                        "region %llu: the local place of shared cluster %llu (guest range [%llu, %llu)) holds bytes",
                        (unsigned long long)r, (unsigned long long)c, (unsigned long long)guest,
                        (unsigned long long)(guest + g->cluster_size));
            }
            if (!any_present) {
                finding(CL_CORRUPT, "shared-reference", label,
                        "guest range [%llu, %llu) (cluster %llu) is shared but has no present sector",
                        (unsigned long long)guest, (unsigned long long)(guest + g->cluster_size),
                        (unsigned long long)c);
                continue;
            }
            if (!l->store && locked_store[0])
                continue; /* the check cannot complete: reported at its end */
            if (!l->store || store_cluster_usable(l->store, ref - 1)) {
                finding(CL_CORRUPT, "shared-reference", label, "guest range [%llu, %llu) (cluster %llu) is shared, but %s",
                        (unsigned long long)guest, (unsigned long long)(guest + g->cluster_size),
                        (unsigned long long)c, l->store ? lc_errmsg : l->store_err);
                continue;
            }
            int touched = 0;
            if (read_view(l->store, (ref - 1) * g->cluster_size, g->cluster_size, cluster, &touched)) {
                finding(CL_CORRUPT, "shared-reference", label, "guest range [%llu, %llu) is shared, but %s",
                        (unsigned long long)guest, (unsigned long long)(guest + g->cluster_size), lc_errmsg);
                continue;
            }
            for (uint64_t s = 0; s < spc; s++)
                if (!PRESENT(c * spc + s))
                    memset(cluster + s * SECTOR_SIZE, 0, SECTOR_SIZE);
            crc = crc32c(0, cluster, g->cluster_size);
        } else if (is_hole(l, coff, g->cluster_size)) {
            /* a hole reads as zero: no absent byte to report, a known CRC */
            for (uint64_t s = 0; s < spc && !any_present; s++)
                any_present = PRESENT(c * spc + s);
            crc = zero_cluster_crc(g->cluster_size, cluster);
        } else {
            if (pread_full(l->fd, cluster, g->cluster_size, coff) < 0) {
                finding(CL_CORRUPT, "data-checksum", label, "cannot read cluster at file offset %llu",
                        (unsigned long long)coff);
                continue;
            }
            for (uint64_t s = 0; s < spc; s++) {
                uint8_t *sec = cluster + s * SECTOR_SIZE;
                if (PRESENT(c * spc + s)) {
                    any_present = 1;
                } else if (!all_zero(sec, SECTOR_SIZE)) {
                    if (!absent_bytes_reported) {
                        absent_bytes_reported = 1;
                        finding(listed ? CL_PENDING : CL_LEAK,
                                listed ? "unflushed-bytes" : "leaked-bytes", label,
                                "region %llu: absent sector at guest offset %llu holds bytes",
                                (unsigned long long)r,
                                (unsigned long long)((first_sector + c * spc + s) * SECTOR_SIZE));
                    }
                    memset(sec, 0, SECTOR_SIZE);
                }
            }
            crc = crc32c(0, cluster, g->cluster_size);
        }
        if (listed)
            continue; /* F-CHECK-002: no data checksums in a listed region */
#ifndef BROKEN_TRUST_CRC
        uint32_t recorded = get_u32(map + MAP_CRCS_OFFSET + 4 * c);
        if (any_present && crc != recorded)
            finding(CL_CORRUPT, "data-checksum", label,
                    "data of guest range [%llu, %llu) (cluster %llu, file offset %llu) does not match its CRC32C",
                    (unsigned long long)guest, (unsigned long long)(guest + g->cluster_size),
                    (unsigned long long)c, (unsigned long long)coff);
        else if (!any_present && recorded != 0)
            finding(CL_CORRUPT, "data-checksum", label,
                    "cluster %llu of region %llu has no present sector but records CRC32C %08x",
                    (unsigned long long)c, (unsigned long long)r, recorded);
#else
        (void)any_present;
        (void)crc;
#endif
    }
    map_free(&maps);
#undef PRESENT
}

/* The next region at or after r that holds a data extent of the file. */
static uint64_t next_data_region(const lc_layer *l, uint64_t r)
{
    const lc_geometry *g = &l->geo;
    uint64_t limit = g->file_length < l->file_size ? g->file_length : l->file_size;
    uint64_t off = g->first_region_offset + r * g->region_stride;
    if (r >= g->num_regions || off >= limit)
        return UINT64_MAX;
    off_t d = lseek(l->fd, (off_t)off, SEEK_DATA);
    if (d < 0)
        return errno == ENXIO ? UINT64_MAX : r;
    if ((uint64_t)d >= limit)
        return UINT64_MAX;
    return ((uint64_t)d - g->first_region_offset) / g->region_stride;
}

static void check_once(lc_layer *l, const char *label);

/* I1-I8 of one Lamina layer file whose root could be selected. */
static void check_layer_file(lc_layer *l, const char *label)
{
    const lc_root *root = l->root;
    const lc_geometry *g = &l->geo;
    int other = 1 - l->roots.current;
    const lc_root *oc = &l->roots.copy[other];
    if (oc->status != COPY_VALID)
        finding(CL_DEGRADED, "root-copy", label, "root copy %c: %s", 'A' + other, oc->why);
    else if (l->roots.other_stale)
        finding(CL_DEGRADED, "root-copy", label, "root copy %c is stale (generation %llu, current %llu)",
                'A' + other, (unsigned long long)oc->generation, (unsigned long long)root->generation);
    if (root->generation == MAX_COUNTER || root->data_generation == MAX_COUNTER ||
        root->next_snapshot_id == MAX_COUNTER)
        finding(CL_CORRUPT, "counter-exhausted", label, "a root counter is at MAX_COUNTER");
    if ((root->flags & FLAG_COMMITTING) &&
        (root->base_kind == BASE_NONE || is_layer_name(root->base_path, root->base_path_length)))
        finding(CL_CORRUPT, "commit-flag", label, "marked committing %s (I8)",
                root->base_kind == BASE_NONE ? "without a base" : "into a snapshot");
    if (l->file_size > g->file_length)
        finding(CL_LEAK, "file-length", label, "the file is %llu bytes, the root says %llu",
                (unsigned long long)l->file_size, (unsigned long long)g->file_length);
    else if (l->file_size < g->file_length)
        finding(CL_CORRUPT, "file-length", label, "the file is %llu bytes, the root says %llu",
                (unsigned long long)l->file_size, (unsigned long long)g->file_length);
    for (uint32_t s = 0; s < 2; s++) {
        char what[64];
        snprintf(what, sizeof what, "root slot %c past root_length", 'A' + s);
        zero_span(l, label, (uint64_t)s * ROOT_SLOT_SIZE + root->root_length,
                  ROOT_SLOT_SIZE - root->root_length, 0, what);
    }
    zero_span(l, label, ROOT_AREA_SIZE, g->first_region_offset - ROOT_AREA_SIZE, 0,
              "the gap between the root area and region 0");
    if (root->num_intents)
        finding(CL_PENDING, "intents", label, "%u regions are listed in the intents (an unclean shutdown)",
                root->num_intents);
    uint8_t *cluster = malloc(g->cluster_size);
    if (!cluster) {
        finding(CL_CORRUPT, "map-unrecoverable", label, "out of memory");
        return;
    }
    if (layer_shared(l)) {
        int src = store_attach(l);
        if (src == LC_ERROR && !locked_store[0]) {
            snprintf(locked_store, sizeof locked_store, "%s", lc_errmsg);
        } else if (src == 0) {
            check_once(l->store, l->store->path); /* the store, once per tree */
        } else {
            /* a store that is there but has no usable root is judged as a
             * layer is: root-unrecoverable, once (and shared-reference for
             * each cluster that needs it, below) */
            const char *why = store_root_unusable_once(l);
            if (why)
                finding(CL_CORRUPT, "root-unrecoverable", NULL, "%s", why);
        }
    }
    uint32_t next_intent = 0;
    uint64_t r = 0;
    for (;;) {
        uint64_t rd = next_data_region(l, r);
        uint64_t ri = next_intent < root->num_intents ? root->intents[next_intent] : UINT64_MAX;
        uint64_t next = rd < ri ? rd : ri;
        if (next == UINT64_MAX || next >= g->num_regions)
            break;
        int listed = is_listed(root, next);
        check_region(l, label, next, listed, cluster);
        while (next_intent < root->num_intents && root->intents[next_intent] <= next)
            next_intent++;
        r = next + 1;
    }
    free(cluster);
}

/* Files reached from the top (T4), by their resolved paths; layers judged. */
static char **reached;
static size_t n_reached;
static struct {
    dev_t dev;
    ino_t ino;
} checked[MAX_CHAIN_DEPTH * 4];
static size_t n_checked;

static void reach(const char *real)
{
    char **nr = realloc(reached, (n_reached + 1) * sizeof *reached);
    if (!nr)
        return;
    reached = nr;
    reached[n_reached] = strdup(real);
    if (reached[n_reached])
        n_reached++;
}

static int is_reached(const char *real)
{
    for (size_t i = 0; i < n_reached; i++)
        if (strcmp(reached[i], real) == 0)
            return 1;
    return 0;
}

static void check_once(lc_layer *l, const char *label)
{
    for (size_t i = 0; i < n_checked; i++)
        if (checked[i].dev == l->dev && checked[i].ino == l->ino)
            return;
    if (n_checked < sizeof checked / sizeof checked[0]) {
        checked[n_checked].dev = l->dev;
        checked[n_checked].ino = l->ino;
        n_checked++;
    }
    check_layer_file(l, label);
}

/* T1: follow the chain below `head`, judging each layer met. */
static void check_chain(lc_layer *head)
{
    int rc = chain_open(head);
    for (lc_layer *l = head; l->base; l = l->base) {
        lc_layer *b = l->base;
        reach(b->real);
        if ((l->root->flags & FLAG_COMMITTING) && b->kind == BASE_LAMINA &&
            b->root->data_generation != l->root->base_data_generation)
            finding(CL_PENDING, "base-reference", l->path,
                    "the base %s was written by the commit in progress", b->path);
        if (b->kind == BASE_LAMINA)
            check_once(b, b->path);
    }
    if (rc)
        finding(CL_CORRUPT, "base-reference", NULL, "%s", lc_errmsg);
}

static void layer_file_name(const uint8_t *uuid, const char *suffix, char *out, size_t outlen)
{
    int k = 0;
    for (int i = 0; i < 16; i++)
        k += snprintf(out + k, outlen - (size_t)k, "%02x", uuid[i]);
    snprintf(out + k, outlen - (size_t)k, "%s", suffix);
}

/* T3: the VM state file has its recorded size and CRC32C. */
static void check_vmstate(const char *image_top, const lc_snapshot *s, int judge)
{
    char name[64], path[PATH_MAX];
    layer_file_name(s->layer_uuid, ".vmstate", name, sizeof name);
    if (snprintf(path, sizeof path, "%s.layers/%s", image_top, name) >= (int)sizeof path) {
        finding(CL_CORRUPT, "vmstate", NULL, "snapshot %s: VM state path too long", s->name);
        return;
    }
    char real[PATH_MAX];
    if (realpath(path, real))
        reach(real); /* named by its entry, so reached, judged or not */
    if (!judge)
        return; /* the layer is already reported missing: as the reference */
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        finding(CL_CORRUPT, "vmstate", NULL, "snapshot %s: VM state %s is missing or not a file", s->name,
                path);
        if (fd >= 0)
            close(fd);
        return;
    }
    if ((uint64_t)st.st_size != s->vmstate_size) {
        finding(CL_CORRUPT, "vmstate", NULL, "snapshot %s: VM state is %llu bytes, recorded %llu",
                s->name, (unsigned long long)st.st_size, (unsigned long long)s->vmstate_size);
        close(fd);
        return;
    }
    static uint8_t buf[1 << 16];
    uint32_t crc = 0;
    for (uint64_t off = 0; off < s->vmstate_size;) {
        size_t n = s->vmstate_size - off < sizeof buf ? (size_t)(s->vmstate_size - off) : sizeof buf;
        if (pread_full(fd, buf, n, off) < 0)
            break;
        crc = crc32c(crc, buf, n);
        off += n;
    }
    if (crc != s->vmstate_crc)
        finding(CL_CORRUPT, "vmstate", NULL, "snapshot %s: VM state does not match its CRC32C", s->name);
    close(fd);
}

static int hexname(const char *name, size_t len)
{
    if (len < 32)
        return 0;
    for (size_t i = 0; i < 32; i++)
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f')))
            return 0;
    const char *rest = name + 32;
    return !strcmp(rest, ".lam") || !strcmp(rest, ".vmstate") || !strcmp(rest, ".lam.creating") ||
           !strcmp(rest, ".vmstate.creating");
}

/* An unreached <uuid>.lam that is a readable layer of that uuid is pending
 * (an interrupted operation); any other is a leak (T4). */
static int readable_layer_of_name(const char *path, const char *name)
{
    lc_layer *l;
    int ok = 0;
    if (layer_open(path, 0, path, BASE_LAMINA, &l) == 0) {
        char want[64];
        layer_file_name(l->root->image_uuid, ".lam", want, sizeof want);
        ok = strcmp(want, name) == 0;
    }
    layer_close_chain(l);
    return ok;
}

/* T4: every file of the layer directory is reached; no <top>.creating.
 * The top's twin (F-TREE-003) is reached: the top's own file, by identity
 * (lstat of both names, as the reference judges it), named after its uuid. */
static void check_layer_directory(const char *image_top, const lc_layer *top)
{
    char dir[PATH_MAX], path[PATH_MAX * 2], real[PATH_MAX], twin[64];
    struct stat st, top_st;
    int top_regular = lstat(image_top, &top_st) == 0 && S_ISREG(top_st.st_mode);
    layer_file_name(top->root->image_uuid, ".lam", twin, sizeof twin);
    if (snprintf(dir, sizeof dir, "%s.layers", image_top) >= (int)sizeof dir)
        return;
    if (lstat(dir, &st) == 0 && !S_ISDIR(st.st_mode)) {
        finding(CL_LEAK, "foreign-file", NULL, "%s is not a real directory", dir);
    } else if (lstat(dir, &st) == 0) {
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (lstat(path, &st) < 0)
                continue;
            if (!S_ISREG(st.st_mode) || !hexname(e->d_name, strlen(e->d_name))) {
                finding(CL_LEAK, "foreign-file", NULL, "%s is not a file the format puts there", path);
                continue;
            }
            if (realpath(path, real) && is_reached(real))
                continue;
            if (top_regular && st.st_dev == top_st.st_dev && st.st_ino == top_st.st_ino &&
                !strcmp(e->d_name, twin))
                continue;
            size_t n = strlen(e->d_name);
            if (n == 36 && !strcmp(e->d_name + 32, ".lam") && !readable_layer_of_name(path, e->d_name))
                finding(CL_LEAK, "orphan-file", NULL, "%s is not reached and is not a layer of its name",
                        path);
            else
                finding(CL_PENDING, "orphan-file", NULL, "%s is not reached from the top", path);
        }
        if (d)
            closedir(d);
    }
    snprintf(path, sizeof path, "%s.creating", image_top);
    if (lstat(path, &st) == 0 && S_ISREG(st.st_mode))
        finding(CL_PENDING, "orphan-file", NULL, "%s is left by an interrupted operation", path);
}

int cmd_check(const char *image)
{
    char image_top[PATH_MAX];
    if (image_of(image, image_top, sizeof image_top))
        return LC_ERROR;
    lc_layer *top;
    int rc = layer_open(image, 1, image_top, BASE_LAMINA, &top);
    if (rc == LC_ERROR || (rc && !top)) {
        layer_close_chain(top);
        fprintf(stderr, "lamina-c: %s\n", lc_errmsg);
        return LC_ERROR;
    }
    if (rc) {
        finding(CL_CORRUPT, "root-unrecoverable", NULL, "%s", lc_errmsg);
        layer_close_chain(top);
        return LC_ERROR;
    }
    reach(top->real);
    check_once(top, NULL);
    check_chain(top);
    const lc_root *root = top->root;
    for (uint32_t i = 0; i < root->num_snapshots; i++) {
        lc_layer *snap;
        rc = open_snapshot_layer(image_top, root, (int)i, &snap);
        if (rc) {
            finding(CL_CORRUPT, "snapshot-layer", NULL, "%s", lc_errmsg);
        } else {
            reach(snap->real);
            check_once(snap, snap->path);
            check_chain(snap);
        }
        layer_close_chain(snap);
        if (root->snapshots[i].vmstate_size)
            check_vmstate(image_top, &root->snapshots[i], rc == 0);
    }
    check_layer_directory(image_top, top);
    layer_close_chain(top);
    store_close_all();
    for (size_t i = 0; i < n_reached; i++)
        free(reached[i]);
    free(reached);
    fflush(stdout);
    if (locked_store[0]) {
        fprintf(stderr, "lamina-c: %s\n", locked_store);
        return LC_ERROR;
    }
    if (found[CL_CORRUPT])
        return 2;
    if (found[CL_DEGRADED] || found[CL_LEAK])
        return 3;
    return 0;
}
