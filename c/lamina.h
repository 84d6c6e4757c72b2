/* lamina.h: constants, structures and shared helpers of lamina-c, a second
 * implementation of the Lamina image format (reader and check), written from
 * spec/FORMAT.md alone.  Every .c file includes this header first, so the
 * feature-test macro below comes before any system header. */
#ifndef LAMINA_H
#define LAMINA_H

#define _GNU_SOURCE /* pread, SEEK_DATA/SEEK_HOLE, O_NOFOLLOW, realpath, openat */

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Constants of FORMAT.md section 2. */
#define FORMAT_VERSION 1u
#define SECTOR_SIZE 512u
#define MIN_CLUSTER_BITS 12u
#define MAX_CLUSTER_BITS 21u
#define CLUSTERS_PER_REGION 128u
#define REGION_STRIDE_CLUSTERS 130u
#define ROOT_SIZE 4096u
#define ROOT_SLOT_SIZE 524288u
#define ROOT_AREA_SIZE 1048576u
#define MAX_VIRTUAL_SIZE (1ull << 50)
#define MAX_INTENTS 960u
#define MAP_HEADER_SIZE 64u
#define MAP_CRCS_OFFSET 64u
#define MAP_BITMAP_OFFSET 576u
#define MAX_BASE_PATH 4096u
#define SNAPSHOT_ENTRY_SIZE 320u
#define MAX_SNAPSHOTS 1024u
#define MAX_CHAIN_DEPTH 2048u
#define MAX_VMSTATE_SIZE (1ull << 46)
#define MAX_COUNTER ((1ull << 63) - 1)
#define FLAG_COMMITTING 1u
#define FEATURE_SHARED_CLUSTERS 1u /* incompatible_features bit 0 (section 13) */
#define KNOWN_INCOMPATIBLE FEATURE_SHARED_CLUSTERS
#define MAP_FLAG_SHARED 1u         /* map flags bit 0: the copy carries `shared` */
#define SHARED_TABLE_SIZE 1024u    /* u64[128] */
#define STORE_NAME "lamina-store.lam"

#define BASE_NONE 0u
#define BASE_RAW 1u
#define BASE_LAMINA 2u

/* Exit codes of the driver protocol (conform/PROTOCOL.md). */
#define LC_OK 0
#define LC_ERROR 1   /* usage, missing file, no such snapshot, I/O */
#define LC_CORRUPT 2 /* a rule of the format is broken */

/* Error state: one message, set by the function that found the problem. */
extern char lc_errmsg[1024];
int lc_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
extern int lc_lock_failed; /* the last failure was a lock another open holds */

/* Little-endian field access on a byte buffer. */
uint32_t get_u32(const uint8_t *p);
uint64_t get_u64(const uint8_t *p);
int all_zero(const uint8_t *p, size_t n);

/* CRC32C (Castagnoli), table-driven; crc32c(0, ...) starts a new sum. */
uint32_t crc32c(uint32_t crc, const void *data, size_t len);

/* UTF-8 and snapshot name rules (F-SNAP-001). */
int utf8_valid(const uint8_t *s, size_t n);
int snapshot_name_valid(const uint8_t *s, size_t n);

/* Why a root or map copy is not valid: the error classes of FORMAT.md. */
typedef enum {
    COPY_VALID = 0,
    COPY_BAD_MAGIC,        /* BadMagic (a zeroed copy is also this) */
    COPY_BAD_CHECKSUM,     /* BadChecksum */
    COPY_OUT_OF_RANGE,     /* FieldOutOfRange */
    COPY_UNSUPPORTED,      /* UnsupportedVersion / UnknownIncompatibleFeature: refuse */
} copy_status;

typedef struct {
    uint64_t id;
    uint8_t layer_uuid[16];
    uint64_t creation_time_ns, vm_clock_ns, vmstate_size, disk_size;
    uint32_t vmstate_crc, name_length;
    char name[256]; /* NUL terminated copy of the name bytes */
} lc_snapshot;

/* One decoded root copy; buf holds its root_length bytes. */
typedef struct {
    copy_status status;
    int zeroed; /* the first 4096 bytes of the slot are all zero */
    char why[256];
    uint8_t *buf;
    uint32_t buf_len;
    uint32_t version, cluster_bits, slot, num_intents, root_length, base_kind;
    uint64_t virtual_size, generation, incompat, compat, autoclear, data_generation;
    uint8_t image_uuid[16], base_uuid[16], store_uuid[16];
    uint64_t base_data_generation, base_size, next_snapshot_id, base_visible;
    uint32_t intents[MAX_INTENTS];
    uint32_t base_path_length, num_snapshots, flags;
    char base_path[MAX_BASE_PATH + 1];
    lc_snapshot *snapshots; /* num_snapshots entries */
} lc_root;

/* Both copies of a file's root and the choice between them (F-ROOT-002). */
typedef struct {
    lc_root copy[2];
    int current;     /* 0 or 1; -1 when neither copy is usable */
    int other_stale; /* the non-current copy is valid but stale */
    int refused;     /* F-ROOT-003: a copy with an unknown version or feature */
} lc_roots;

/* Geometry derived from cluster_bits and virtual_size. */
typedef struct {
    uint64_t cluster_size, region_span, region_stride, first_region_offset;
    uint64_t num_regions, file_length, map_used;
} lc_geometry;

void geometry_of(uint32_t cluster_bits, uint64_t virtual_size, lc_geometry *g);

int root_read_both(int fd, uint64_t file_size, lc_roots *roots);
void root_free(lc_roots *roots);
int is_layer_name(const char *name, size_t len);

/* One map copy, judged by F-MAP-001. */
typedef struct {
    copy_status status;
    int zeroed; /* the used length is all zero */
    char why[200];
    uint8_t *buf; /* used length bytes (and the shared table's place) */
    uint32_t used; /* the used length: 576 + cluster_size / 32, + 1024 with the table */
    int has_table; /* flags bit 0 in a layer that sets shared-clusters */
    uint64_t generation;
} lc_mapcopy;

typedef enum { MAP_CURRENT, MAP_NEVER_WRITTEN, MAP_NO_VALID_COPY } map_state;

typedef struct {
    lc_mapcopy copy[2];
    map_state state;
    int current;     /* when MAP_CURRENT */
    int other_stale; /* the other copy is valid and stale */
} lc_maps;

int map_read_both(int fd, uint64_t file_size, const lc_geometry *g, const uint8_t *image_uuid,
                  int shared_layer, uint64_t region, lc_maps *maps);
uint64_t map_shared_ref(const lc_mapcopy *m, const lc_geometry *g, uint64_t c);
void map_free(lc_maps *maps);
int map_present(const uint8_t *map, uint64_t sector);

/* A layer of a chain: a Lamina layer file or a raw base. */
typedef struct lc_layer {
    int fd;
    unsigned kind; /* BASE_RAW or BASE_LAMINA */
    char path[4096];      /* the path it was opened by (for messages) */
    char real[4096];      /* the path with every link resolved */
    char image_top[4096]; /* the top of the image this file belongs to */
    dev_t dev;
    ino_t ino;
    uint64_t file_size;
    lc_roots roots;
    lc_root *root; /* the current copy */
    lc_geometry geo;
    uint64_t visible; /* min(base_visible, size of the base): where the base shows */
    struct lc_layer *base;
    /* the shared store (section 13) when the root sets shared-clusters;
     * owned by the store table of layers.c, never by this layer */
    struct lc_layer *store;
    int store_failed;     /* the store cannot be used: store_err says why */
    int store_entry;      /* 1 + its index in the store table of layers.c */
    char store_err[1024];
    /* one-region map cache of the reader */
    int64_t cached_region;
    lc_maps cached;
} lc_layer;

int layer_open(const char *path, int is_top, const char *image_top, unsigned kind,
               lc_layer **out);
void layer_close_chain(lc_layer *layer);
int chain_open(lc_layer *top);
int image_of(const char *real, char *out, size_t outlen);
int resolve_base(const lc_layer *layer, char *out, size_t outlen, char *image_top,
                 size_t image_len);
int store_attach(lc_layer *l);
int chain_attach_stores(lc_layer *top);
void store_close_all(void);
const char *store_root_unusable_once(const lc_layer *l);
int find_snapshot(const lc_root *root, const char *name);
int open_snapshot_layer(const char *image, const lc_root *root, int idx, lc_layer **out);
int read_view(lc_layer *layer, uint64_t off, uint64_t len, uint8_t *buf, int *touched);
int store_cluster_usable(lc_layer *store, uint64_t s);
int load_map(lc_layer *l, uint64_t r);
int layer_shared(const lc_layer *l);
int pread_full(int fd, void *buf, size_t len, uint64_t off);

int cmd_dump(const char *target, const char *out);
int cmd_check(const char *image);

#endif
