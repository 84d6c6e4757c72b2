/* layers.c: opening layer files, resolving base references and snapshots
 * (FORMAT.md section 9: F-REF-001 to F-REF-005, F-OPEN-001 to F-OPEN-003,
 * F-SNAP-003, F-SNAP-004). */
#include "lamina.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int copy_str(char *out, size_t outlen, const char *s)
{
    size_t n = strlen(s);
    if (n >= outlen)
        return lc_fail(LC_ERROR, "path too long: %.64s...", s);
    memcpy(out, s, n + 1);
    return 0;
}

/* The directory part of a path, "." when it has none. */
static void dir_of(const char *path, char *out, size_t outlen)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        snprintf(out, outlen, ".");
    } else if (slash == path) {
        snprintf(out, outlen, "/");
    } else {
        snprintf(out, outlen, "%.*s", (int)(slash - path), path);
    }
}

/* image_of (F-REF-005): a file <uuid hex>.lam in a directory X.layers is a
 * frozen layer of image X; any other file is the top of its own image. */
int image_of(const char *path, char *out, size_t outlen)
{
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (slash && is_layer_name(base, strlen(base))) {
        size_t dlen = (size_t)(slash - path);
        const char *dstart = path;
        for (size_t i = 0; i < dlen; i++)
            if (path[i] == '/')
                dstart = path + i + 1;
        size_t namelen = dlen - (size_t)(dstart - path);
        if (namelen > 7 && !memcmp(path + dlen - 7, ".layers", 7)) {
            if (dlen - 7 >= outlen)
                return lc_fail(LC_ERROR, "path too long");
            memcpy(out, path, dlen - 7);
            out[dlen - 7] = 0;
            return 0;
        }
    }
    return copy_str(out, outlen, path);
}

int layer_open(const char *path, int is_top, const char *image_top, unsigned kind,
               lc_layer **out)
{
    *out = NULL;
    lc_layer *l = calloc(1, sizeof *l);
    if (!l)
        return lc_fail(LC_ERROR, "out of memory");
    l->fd = -1;
    l->kind = kind;
    l->cached_region = -1;
    if (copy_str(l->path, sizeof l->path, path) || copy_str(l->image_top, sizeof l->image_top, image_top)) {
        free(l);
        return LC_ERROR;
    }
    int flags = O_RDONLY | O_NONBLOCK | O_CLOEXEC | (is_top ? 0 : O_NOFOLLOW);
    l->fd = open(path, flags);
    if (l->fd < 0) {
        int e = errno;
        free(l);
        if (e == ELOOP)
            return lc_fail(LC_ERROR, "%s: is a symbolic link, which may not stand here", path);
        return lc_fail(LC_ERROR, "%s: cannot open: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(l->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        layer_close_chain(l);
        return lc_fail(LC_ERROR, "%s: is not a regular file", path);
    }
    /* F-LOCK-001: a reader holds a shared OFD lock on every file it reads. */
    struct flock lk = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(l->fd, F_OFD_SETLK, &lk) < 0 && errno != EINVAL && errno != ENOLCK) {
        int e = errno;
        layer_close_chain(l);
        if (e == EAGAIN || e == EACCES) {
            lc_lock_failed = 1;
            return lc_fail(LC_ERROR, "%s: is locked by another process (ImageLocked)", path);
        }
        return lc_fail(LC_ERROR, "%s: cannot lock: %s", path, strerror(e));
    }
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    l->file_size = (uint64_t)st.st_size;
    if (!realpath(path, l->real))
        copy_str(l->real, sizeof l->real, path);
    *out = l;
    if (kind == BASE_RAW)
        return 0;
    if (root_read_both(l->fd, l->file_size, &l->roots))
        return LC_ERROR;
    if (l->roots.refused) {
        const lc_root *c = l->roots.copy[0].status == COPY_UNSUPPORTED ? &l->roots.copy[0]
                                                                        : &l->roots.copy[1];
        return lc_fail(LC_CORRUPT, "%s: root copy %c: %s: refusing to open", path,
                       c == &l->roots.copy[0] ? 'A' : 'B', c->why);
    }
    if (l->roots.current < 0)
        return lc_fail(LC_CORRUPT, "%s: both root copies are unusable: root copy A: %s; root copy B: %s",
                       path, l->roots.copy[0].why, l->roots.copy[1].why);
    l->root = &l->roots.copy[l->roots.current];
    geometry_of(l->root->cluster_bits, l->root->virtual_size, &l->geo);
    return 0;
}

void layer_close_chain(lc_layer *layer)
{
    while (layer) {
        lc_layer *next = layer->base;
        if (layer->fd >= 0)
            close(layer->fd);
        root_free(&layer->roots);
        map_free(&layer->cached);
        free(layer);
        layer = next;
    }
}

/* resolve_base: where the base reference of `layer` leads (F-REF-001,
 * F-REF-004, F-REF-005), and the image that file belongs to. */
int resolve_base(const lc_layer *layer, char *out, size_t outlen, char *image_top,
                 size_t image_len)
{
    const char *name = layer->root->base_path;
    size_t n = layer->root->base_path_length;
    if (is_layer_name(name, n)) {
        char dir[PATH_MAX];
        struct stat st;
        if (snprintf(dir, sizeof dir, "%s.layers", layer->image_top) >= (int)sizeof dir)
            return lc_fail(LC_CORRUPT, "%s: layer directory path too long", layer->path);
        if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
            return lc_fail(LC_CORRUPT, "%s: base %s: %s is not a real directory", layer->path,
                           name, dir);
        if (snprintf(out, outlen, "%s/%s", dir, name) >= (int)outlen)
            return lc_fail(LC_CORRUPT, "%s: base path too long", layer->path);
        return copy_str(image_top, image_len, layer->image_top);
    }
    char topdir[PATH_MAX], joined[PATH_MAX * 2], rdir[PATH_MAX], resolved[PATH_MAX];
    dir_of(layer->image_top, topdir, sizeof topdir);
    int jn = name[0] == '/' ? snprintf(joined, sizeof joined, "%s", name)
                            : snprintf(joined, sizeof joined, "%s/%s", topdir, name);
    if (jn >= (int)sizeof joined)
        return lc_fail(LC_CORRUPT, "%s: base path too long", layer->path);
    if (!realpath(topdir, rdir))
        return lc_fail(LC_CORRUPT, "%s: cannot resolve the directory %s", layer->path, topdir);
    if (!realpath(joined, resolved))
        return lc_fail(LC_CORRUPT, "%s: base %s: cannot be followed: %s", layer->path, name,
                       strerror(errno));
    size_t dl = strlen(rdir);
    int inside = strcmp(rdir, "/") == 0 ? resolved[0] == '/' && resolved[1] != 0
                                        : strncmp(resolved, rdir, dl) == 0 && resolved[dl] == '/';
    if (!inside)
        return lc_fail(LC_CORRUPT, "%s: base %s resolves to %s, outside %s (BaseReferenceError)",
                       layer->path, name, resolved, rdir);
    if (copy_str(out, outlen, resolved))
        return LC_CORRUPT;
    return image_of(resolved, image_top, image_len) ? LC_CORRUPT : 0;
}

/* Follow the chain below `top` (F-REF-002, F-REF-003).  On an error the
 * chain stays open down to the last layer that could be followed. */
int chain_open(lc_layer *top)
{
    lc_layer *l = top;
    unsigned depth = 1;
    while (l->kind == BASE_LAMINA && l->root->base_kind != BASE_NONE) {
        char path[PATH_MAX], image_top[PATH_MAX];
        int rc = resolve_base(l, path, sizeof path, image_top, sizeof image_top);
        if (rc)
            return LC_CORRUPT;
        if (++depth > MAX_CHAIN_DEPTH)
            return lc_fail(LC_CORRUPT, "%s: the chain is longer than %u files (ChainTooDeep)",
                           top->path, MAX_CHAIN_DEPTH);
        lc_layer *b;
        rc = layer_open(path, 0, image_top, l->root->base_kind, &b);
        if (rc) {
            char msg[sizeof lc_errmsg];
            memcpy(msg, lc_errmsg, sizeof msg);
            layer_close_chain(b);
            return lc_fail(LC_CORRUPT, "%s: base %s: %s", l->path, l->root->base_path, msg);
        }
        for (lc_layer *p = top; p; p = p->base) {
            if (p->dev == b->dev && p->ino == b->ino) {
                layer_close_chain(b);
                return lc_fail(LC_CORRUPT, "%s: base %s is a file the chain already passed (BaseLoop)",
                               l->path, path);
            }
        }
        char holder[PATH_MAX];
        if (b->kind == BASE_LAMINA && image_of(path, holder, sizeof holder) == 0 &&
            strcmp(holder, path) != 0) {
            /* F-OPEN-003: a file named <uuid hex>.lam in a layer directory
             * holds the layer of that uuid, on every path that opens it. */
            char want[40];
            const char *name = strrchr(path, '/') + 1;
            for (int i = 0; i < 16; i++)
                snprintf(want + 2 * i, 3, "%02x", b->root->image_uuid[i]);
            if (strncmp(name, want, 32) != 0) {
                layer_close_chain(b);
                return lc_fail(LC_CORRUPT, "%s: %s holds another layer than its name says (LayerMismatch)",
                               l->path, path);
            }
        }
        uint64_t size;
        if (b->kind == BASE_RAW) {
            size = b->file_size;
            if (size != l->root->base_size) {
                layer_close_chain(b);
                return lc_fail(LC_CORRUPT, "%s: raw base %s is %llu bytes, recorded %llu (BaseChanged)",
                               l->path, path, (unsigned long long)size,
                               (unsigned long long)l->root->base_size);
            }
        } else {
            size = b->root->virtual_size;
            int committing = (l->root->flags & FLAG_COMMITTING) != 0;
            if (memcmp(b->root->image_uuid, l->root->base_uuid, 16) != 0 ||
                size != l->root->base_size ||
                (!committing && b->root->data_generation != l->root->base_data_generation)) {
                layer_close_chain(b);
                return lc_fail(LC_CORRUPT, "%s: base %s is not the layer recorded (BaseChanged)",
                               l->path, path);
            }
        }
        l->visible = l->root->base_visible < size ? l->root->base_visible : size;
#ifdef BROKEN_BASE_PAST_END
        /* Defect: the base shows through up to this layer's own end. */
        l->visible = l->root->virtual_size;
#endif
        l->base = b;
        l = b;
    }
    return 0;
}

/* The shared stores opened so far (F-SHARE-001), one per directory, so a
 * tree's layers share one open store and check judges it once. */
#define MAX_STORES 64
static struct store_entry {
    char path[PATH_MAX];
    lc_layer *layer; /* NULL when it could not be opened */
    int rc;
    int roots_unusable; /* it opened, but neither root copy could be used */
    int reported;       /* check reported that once */
    char err[1024];
} stores[MAX_STORES];
static size_t n_stores;

int layer_shared(const lc_layer *l)
{
    return l->kind == BASE_LAMINA && l->root && (l->root->incompat & FEATURE_SHARED_CLUSTERS) != 0;
}

static int store_fail(lc_layer *l, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int store_fail(lc_layer *l, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l->store_err, sizeof l->store_err, fmt, ap);
    va_end(ap);
    l->store_failed = 1;
    return lc_fail(code, "%s", l->store_err);
}

/* F-SHARE-001: the store of a layer whose root sets shared-clusters is
 * lamina-store.lam in the directory of its image's top, opened with the
 * guarded open; it must be a layer without a base and without
 * shared-clusters, of the layer's cluster size, whose image_uuid is the
 * layer's store_uuid.  Else SharedReferenceError (exit 2; 1 for a lock). */
int store_attach(lc_layer *l)
{
    if (!layer_shared(l) || l->store)
        return 0;
    if (l->store_failed)
        return lc_fail(LC_CORRUPT, "%s", l->store_err);
    char dir[PATH_MAX], rdir[PATH_MAX], path[PATH_MAX];
    dir_of(l->image_top, dir, sizeof dir);
    if (!realpath(dir, rdir))
        return store_fail(l, LC_CORRUPT, "%s: cannot resolve the directory %s of its store (SharedReferenceError)",
                          l->path, dir);
    if (snprintf(path, sizeof path, "%s/%s", strcmp(rdir, "/") ? rdir : "", STORE_NAME) >= (int)sizeof path)
        return store_fail(l, LC_CORRUPT, "%s: store path too long (SharedReferenceError)", l->path);
    struct store_entry *e = NULL;
    for (size_t i = 0; i < n_stores; i++)
        if (!strcmp(stores[i].path, path))
            e = &stores[i];
    if (!e) {
        if (n_stores == MAX_STORES)
            return store_fail(l, LC_ERROR, "%s: more than %u stores in one tree", l->path, MAX_STORES);
        e = &stores[n_stores++];
        memset(e, 0, sizeof *e);
        memcpy(e->path, path, strlen(path) + 1);
        struct stat st;
        lc_lock_failed = 0;
        if (lstat(path, &st) < 0 && errno == ENOENT) {
            e->rc = LC_CORRUPT;
            snprintf(e->err, sizeof e->err, "%.900s does not exist", path);
        } else if ((e->rc = layer_open(path, 0, path, BASE_LAMINA, &e->layer)) != 0) {
            snprintf(e->err, sizeof e->err, "%s", lc_errmsg);
            e->roots_unusable = e->rc == LC_CORRUPT && e->layer != NULL;
            if (!lc_lock_failed)
                e->rc = LC_CORRUPT;
            layer_close_chain(e->layer);
            e->layer = NULL;
        }
    }
    l->store_entry = (int)(e - stores) + 1;
    if (e->rc == LC_ERROR)
        return store_fail(l, e->rc, "%s: its data is shared through a store held by a writer: %s", l->path,
                          e->err);
    if (e->rc)
        return store_fail(l, e->rc, "%s: its data is shared through a store that cannot be used: %s (SharedReferenceError)",
                          l->path, e->err);
    const lc_root *sr = e->layer->root;
    if (sr->base_kind != BASE_NONE || (sr->incompat & FEATURE_SHARED_CLUSTERS))
        return store_fail(l, LC_CORRUPT, "%s: the store %s has a base or shared clusters of its own (SharedReferenceError)",
                          l->path, path);
    if (memcmp(sr->image_uuid, l->root->store_uuid, 16) != 0)
        return store_fail(l, LC_CORRUPT, "%s: the store %s is another store than the layer's store_uuid names (SharedReferenceError)",
                          l->path, path);
    if (sr->cluster_bits != l->root->cluster_bits)
        return store_fail(l, LC_CORRUPT, "%s: the store %s has clusters of %llu bytes, the layer %llu (SharedReferenceError)",
                          l->path, path, 1ull << sr->cluster_bits, 1ull << l->root->cluster_bits);
    l->store = e->layer;
    return 0;
}

/* The store of every Lamina layer of an open chain (a reader's view). */
int chain_attach_stores(lc_layer *top)
{
    for (lc_layer *l = top; l; l = l->base) {
        int rc = store_attach(l);
        if (rc)
            return rc;
    }
    return 0;
}

/* The first time it is asked for a store whose roots are both unusable:
 * its message (check reports the store's root-unrecoverable once). */
const char *store_root_unusable_once(const lc_layer *l)
{
    if (l->store_entry <= 0 || (size_t)l->store_entry > n_stores)
        return NULL;
    struct store_entry *e = &stores[l->store_entry - 1];
    if (!e->roots_unusable || e->reported)
        return NULL;
    e->reported = 1;
    return e->err;
}

void store_close_all(void)
{
    for (size_t i = 0; i < n_stores; i++)
        layer_close_chain(stores[i].layer);
    n_stores = 0;
}

int find_snapshot(const lc_root *root, const char *name)
{
    for (uint32_t i = 0; i < root->num_snapshots; i++)
        if (strcmp(root->snapshots[i].name, name) == 0)
            return (int)i;
    for (uint32_t i = 0; i < root->num_snapshots; i++) {
        char id[32];
        snprintf(id, sizeof id, "%llu", (unsigned long long)root->snapshots[i].id);
        if (strcmp(id, name) == 0)
            return (int)i;
    }
    return -1;
}

/* F-SNAP-004, F-OPEN-002, F-OPEN-003: the snapshot's layer, by its uuid,
 * from a real layer directory, holding that uuid. */
int open_snapshot_layer(const char *image, const lc_root *root, int idx, lc_layer **out)
{
    char dir[PATH_MAX], path[PATH_MAX];
    const lc_snapshot *s = &root->snapshots[idx];
    struct stat st;
    *out = NULL;
    if (snprintf(dir, sizeof dir, "%s.layers", image) >= (int)sizeof dir)
        return lc_fail(LC_ERROR, "path too long");
    if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
        return lc_fail(LC_CORRUPT, "%s: snapshot %s: the layer directory %s is not a real directory",
                       image, s->name, dir);
    int k = snprintf(path, sizeof path, "%s/", dir);
    for (int i = 0; i < 16; i++)
        k += snprintf(path + k, sizeof path - (size_t)k, "%02x", s->layer_uuid[i]);
    snprintf(path + k, sizeof path - (size_t)k, ".lam");
    int rc = layer_open(path, 0, image, BASE_LAMINA, out);
    if (rc) {
        char msg[sizeof lc_errmsg];
        memcpy(msg, lc_errmsg, sizeof msg);
        return lc_fail(LC_CORRUPT, "%s: snapshot %s: %s", image, s->name, msg);
    }
    if (memcmp((*out)->root->image_uuid, s->layer_uuid, 16) != 0)
        return lc_fail(LC_CORRUPT, "%s: snapshot %s: %s holds another layer (LayerMismatch)", image,
                       s->name, path);
    return 0;
}
