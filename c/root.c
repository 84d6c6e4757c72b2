/* root.c: reading, judging and selecting the two root copies (FORMAT.md
 * section 3, F-ROOT-001 to F-ROOT-009). */
#include "lamina.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t ROOT_MAGIC[8] = {0x8a, 'L', 'A', 'M', 'I', 'N', 'A', '\n'};

void geometry_of(uint32_t cluster_bits, uint64_t virtual_size, lc_geometry *g)
{
    g->cluster_size = 1ull << cluster_bits;
    g->region_span = CLUSTERS_PER_REGION * g->cluster_size;
    g->region_stride = REGION_STRIDE_CLUSTERS * g->cluster_size;
    g->first_region_offset = g->cluster_size > ROOT_AREA_SIZE ? g->cluster_size : ROOT_AREA_SIZE;
    g->num_regions = virtual_size / g->region_span + (virtual_size % g->region_span != 0);
    g->file_length = g->first_region_offset + g->num_regions * g->region_stride;
    g->map_used = MAP_BITMAP_OFFSET + g->cluster_size / 32;
}

/* F-REF-004: 32 lowercase hexadecimal digits and ".lam", nothing else. */
int is_layer_name(const char *name, size_t len)
{
    if (len != 36 || memcmp(name + 32, ".lam", 4) != 0)
        return 0;
    for (size_t i = 0; i < 32; i++)
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f')))
            return 0;
    return 1;
}

static copy_status bad(lc_root *r, copy_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static copy_status bad(lc_root *r, copy_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->why, sizeof r->why, fmt, ap);
    va_end(ap);
    r->status = s;
    return s;
}

static int counter_ok(uint64_t v) { return v >= 1 && v <= MAX_COUNTER; }

static void decode_fixed(lc_root *r)
{
    const uint8_t *b = r->buf;
    r->version = get_u32(b + 8);
    r->cluster_bits = get_u32(b + 12);
    r->virtual_size = get_u64(b + 16);
    r->generation = get_u64(b + 24);
    r->incompat = get_u64(b + 32);
    r->compat = get_u64(b + 40);
    r->autoclear = get_u64(b + 48);
    memcpy(r->image_uuid, b + 56, 16);
    r->slot = get_u32(b + 72);
    r->num_intents = get_u32(b + 76);
    r->root_length = get_u32(b + 80);
    r->base_kind = get_u32(b + 84);
    r->data_generation = get_u64(b + 88);
    memcpy(r->base_uuid, b + 96, 16);
    r->base_data_generation = get_u64(b + 112);
    r->base_size = get_u64(b + 120);
    for (unsigned i = 0; i < MAX_INTENTS; i++)
        r->intents[i] = get_u32(b + 128 + 4 * i);
    r->base_path_length = get_u32(b + 3968);
    r->num_snapshots = get_u32(b + 3972);
    r->next_snapshot_id = get_u64(b + 3976);
    r->flags = get_u32(b + 3984);
    r->base_visible = get_u64(b + 3988);
    memcpy(r->store_uuid, b + 3996, 16);
}

/* Every field rule and structure rule after version and features. */
static copy_status judge_fields(lc_root *r, uint32_t position)
{
    const uint8_t *b = r->buf;
    if (r->cluster_bits < MIN_CLUSTER_BITS || r->cluster_bits > MAX_CLUSTER_BITS)
        return bad(r, COPY_OUT_OF_RANGE, "cluster_bits %u is not 12 to 21", r->cluster_bits);
    if (r->virtual_size % SECTOR_SIZE || r->virtual_size > MAX_VIRTUAL_SIZE)
        return bad(r, COPY_OUT_OF_RANGE, "virtual_size %llu is not a multiple of 512 up to 2^50",
                   (unsigned long long)r->virtual_size);
    if (!counter_ok(r->generation))
        return bad(r, COPY_OUT_OF_RANGE, "generation %llu out of range",
                   (unsigned long long)r->generation);
    if (all_zero(r->image_uuid, 16))
        return bad(r, COPY_OUT_OF_RANGE, "image_uuid is all zero");
    if (r->slot != position)
        return bad(r, COPY_OUT_OF_RANGE, "slot %u in the copy at position %u", r->slot, position);
    if (r->num_intents > MAX_INTENTS)
        return bad(r, COPY_OUT_OF_RANGE, "num_intents %u above 960", r->num_intents);
    if (r->base_kind > BASE_LAMINA)
        return bad(r, COPY_OUT_OF_RANGE, "base_kind %u is not 0, 1 or 2", r->base_kind);
    if (!counter_ok(r->data_generation))
        return bad(r, COPY_OUT_OF_RANGE, "data_generation %llu out of range",
                   (unsigned long long)r->data_generation);
    if (r->base_kind != BASE_LAMINA && !all_zero(r->base_uuid, 16))
        return bad(r, COPY_OUT_OF_RANGE, "base_uuid set without a Lamina base");
    if (r->base_kind != BASE_LAMINA && r->base_data_generation != 0)
        return bad(r, COPY_OUT_OF_RANGE, "base_data_generation set without a Lamina base");
    if (r->base_data_generation > MAX_COUNTER)
        return bad(r, COPY_OUT_OF_RANGE, "base_data_generation above MAX_COUNTER");
    if (r->base_kind == BASE_NONE && r->base_size != 0)
        return bad(r, COPY_OUT_OF_RANGE, "base_size set without a base");
    lc_geometry g;
    geometry_of(r->cluster_bits, r->virtual_size, &g);
    for (uint32_t i = 0; i < r->num_intents; i++) {
        if (r->intents[i] >= g.num_regions)
            return bad(r, COPY_OUT_OF_RANGE, "intent %u names region %u of %llu", i,
                       r->intents[i], (unsigned long long)g.num_regions);
        if (i > 0 && r->intents[i] <= r->intents[i - 1])
            return bad(r, COPY_OUT_OF_RANGE, "intents are not strictly ascending at entry %u", i);
    }
    if (!all_zero(b + 128 + 4 * r->num_intents, 4 * (MAX_INTENTS - r->num_intents)))
        return bad(r, COPY_OUT_OF_RANGE, "unused intents entries are not zero");
    if (r->base_path_length > MAX_BASE_PATH)
        return bad(r, COPY_OUT_OF_RANGE, "base_path_length %u above 4096", r->base_path_length);
    if ((r->base_path_length == 0) != (r->base_kind == BASE_NONE))
        return bad(r, COPY_OUT_OF_RANGE, "base_path_length %u with base_kind %u",
                   r->base_path_length, r->base_kind);
    if (r->num_snapshots > MAX_SNAPSHOTS)
        return bad(r, COPY_OUT_OF_RANGE, "num_snapshots %u above 1024", r->num_snapshots);
    if (!counter_ok(r->next_snapshot_id))
        return bad(r, COPY_OUT_OF_RANGE, "next_snapshot_id out of range");
    if (r->flags & ~FLAG_COMMITTING)
        return bad(r, COPY_OUT_OF_RANGE, "unknown flags 0x%x", r->flags);
    if (r->base_kind == BASE_NONE && r->base_visible != 0)
        return bad(r, COPY_OUT_OF_RANGE, "base_visible set without a base");
    if (r->base_visible > r->virtual_size || r->base_visible > r->base_size)
        return bad(r, COPY_OUT_OF_RANGE, "base_visible %llu above virtual_size or base_size",
                   (unsigned long long)r->base_visible);
    /* F-SHARE-001, F-ROOT-009: store_uuid is not all zero exactly when
     * shared-clusters is set; reserved (4012-4091) is all zero. */
    if ((r->incompat & FEATURE_SHARED_CLUSTERS) && all_zero(r->store_uuid, 16))
        return bad(r, COPY_OUT_OF_RANGE, "shared-clusters is set but store_uuid is all zero");
    if (!(r->incompat & FEATURE_SHARED_CLUSTERS) && !all_zero(r->store_uuid, 16))
        return bad(r, COPY_OUT_OF_RANGE, "store_uuid is set without shared-clusters");
    if (!all_zero(b + 4012, 80))
        return bad(r, COPY_OUT_OF_RANGE, "reserved bytes are not zero");
    /* structure: root_length, the tail */
    uint64_t pad = ((uint64_t)r->base_path_length + 7) & ~7ull;
    uint64_t want = ROOT_SIZE + pad + (uint64_t)SNAPSHOT_ENTRY_SIZE * r->num_snapshots;
    if (r->root_length != want)
        return bad(r, COPY_OUT_OF_RANGE, "root_length %u, the tail needs %llu", r->root_length,
                   (unsigned long long)want);
    const uint8_t *path = b + ROOT_SIZE;
    if (memchr(path, 0, r->base_path_length) || !utf8_valid(path, r->base_path_length))
        return bad(r, COPY_OUT_OF_RANGE, "base_path holds a NUL or is not UTF-8");
    if (!all_zero(path + r->base_path_length, pad - r->base_path_length))
        return bad(r, COPY_OUT_OF_RANGE, "base_path padding is not zero");
    memcpy(r->base_path, path, r->base_path_length);
    r->base_path[r->base_path_length] = 0;
    r->snapshots = calloc(r->num_snapshots ? r->num_snapshots : 1, sizeof *r->snapshots);
    if (!r->snapshots)
        return bad(r, COPY_OUT_OF_RANGE, "out of memory");
    for (uint32_t i = 0; i < r->num_snapshots; i++) {
        const uint8_t *e = b + ROOT_SIZE + pad + (uint64_t)SNAPSHOT_ENTRY_SIZE * i;
        lc_snapshot *s = &r->snapshots[i];
        s->id = get_u64(e);
        memcpy(s->layer_uuid, e + 8, 16);
        s->creation_time_ns = get_u64(e + 24);
        s->vm_clock_ns = get_u64(e + 32);
        s->vmstate_size = get_u64(e + 40);
        s->disk_size = get_u64(e + 48);
        s->vmstate_crc = get_u32(e + 56);
        s->name_length = get_u32(e + 60);
        if (!counter_ok(s->id) || s->id >= r->next_snapshot_id)
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: id out of range", i);
        if (all_zero(s->layer_uuid, 16))
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: layer_uuid is all zero", i);
        if (!memcmp(s->layer_uuid, r->image_uuid, 16))
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: layer_uuid is the image's own uuid", i);
        if (s->vmstate_size > MAX_VMSTATE_SIZE)
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: vmstate_size too large", i);
        if (s->disk_size % SECTOR_SIZE)
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: disk_size not a multiple of 512", i);
        if (s->vmstate_size == 0 && s->vmstate_crc != 0)
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: vmstate_crc without VM state", i);
        if (s->name_length < 1 || s->name_length > 255)
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: name_length %u", i, s->name_length);
        if (!snapshot_name_valid(e + 64, s->name_length))
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: name is not valid (F-SNAP-001)", i);
        if (!all_zero(e + 64 + s->name_length, 256 - s->name_length))
            return bad(r, COPY_OUT_OF_RANGE, "snapshot %u: name padding is not zero", i);
        memcpy(s->name, e + 64, s->name_length);
        s->name[s->name_length] = 0;
        for (uint32_t j = 0; j < i; j++) {
            const lc_snapshot *t = &r->snapshots[j];
            if (t->id == s->id || !memcmp(t->layer_uuid, s->layer_uuid, 16) ||
                (t->name_length == s->name_length && !memcmp(t->name, s->name, s->name_length)))
                return bad(r, COPY_OUT_OF_RANGE, "snapshots %u and %u share an id, name or layer",
                           j, i);
        }
    }
    r->status = COPY_VALID;
    return COPY_VALID;
}

/* Read and judge the copy in slot `position` in the order of F-ROOT-001.
 * Returns 0, or LC_ERROR on an I/O error. */
static int root_read_copy(int fd, uint64_t file_size, uint32_t position, lc_root *r)
{
    uint64_t base = (uint64_t)position * ROOT_SLOT_SIZE;
    memset(r, 0, sizeof *r);
    r->buf = malloc(ROOT_SIZE);
    if (!r->buf)
        return lc_fail(LC_ERROR, "out of memory");
    r->buf_len = ROOT_SIZE;
    if (pread_full(fd, r->buf, ROOT_SIZE, base) < 0)
        return lc_fail(LC_ERROR, "cannot read root copy %c: I/O error", 'A' + position);
    r->zeroed = all_zero(r->buf, ROOT_SIZE);
    if (file_size > base && file_size < base + ROOT_SIZE) {
        /* a copy the file's end cuts short; one wholly past the end is zero */
        bad(r, COPY_OUT_OF_RANGE, "the file ends inside the copy's 4096 bytes");
        return 0;
    }
    if (memcmp(r->buf, ROOT_MAGIC, 8) != 0) {
        bad(r, COPY_BAD_MAGIC, r->zeroed ? "copy is zeroed" : "bad magic at byte 0");
        return 0;
    }
    uint32_t len = get_u32(r->buf + 80);
    if (len < ROOT_SIZE || len > ROOT_SLOT_SIZE) {
        bad(r, COPY_OUT_OF_RANGE, "root_length %u is not 4096 to 524288", len);
        return 0;
    }
    if (base + len > file_size) {
        bad(r, COPY_OUT_OF_RANGE, "root_length %u reaches past the end of the file", len);
        return 0;
    }
    if (len > ROOT_SIZE) {
        uint8_t *nb = realloc(r->buf, len);
        if (!nb)
            return lc_fail(LC_ERROR, "out of memory");
        r->buf = nb;
        r->buf_len = len;
        if (pread_full(fd, r->buf + ROOT_SIZE, len - ROOT_SIZE, base + ROOT_SIZE) < 0)
            return lc_fail(LC_ERROR, "cannot read root copy %c: I/O error", 'A' + position);
    }
    uint32_t stored = get_u32(r->buf + 4092);
    uint8_t saved[4];
    memcpy(saved, r->buf + 4092, 4);
    memset(r->buf + 4092, 0, 4);
    uint32_t computed = crc32c(0, r->buf, len);
    memcpy(r->buf + 4092, saved, 4);
#ifndef BROKEN_TRUST_CRC
    if (computed != stored) {
        bad(r, COPY_BAD_CHECKSUM, "CRC32C at byte 4092 does not match its contents");
        return 0;
    }
#else
    (void)computed;
    (void)stored;
#endif
    decode_fixed(r);
    if (r->version != FORMAT_VERSION) {
        bad(r, COPY_UNSUPPORTED, "format version %u is not 1 (UnsupportedVersion)", r->version);
        return 0;
    }
    if (r->incompat & ~(uint64_t)KNOWN_INCOMPATIBLE) {
        bad(r, COPY_UNSUPPORTED, "unknown incompatible features 0x%llx (UnknownIncompatibleFeature)",
            (unsigned long long)(r->incompat & ~(uint64_t)KNOWN_INCOMPATIBLE));
        return 0;
    }
    judge_fields(r, position);
    return 0;
}

/* Equal content of twins: byte for byte except slot and crc (F-ROOT-002). */
#ifndef BROKEN_IGNORE_SECOND_COPY
static int twins_equal(const lc_root *a, const lc_root *b)
{
    if (a->root_length != b->root_length)
        return 0;
    return !memcmp(a->buf, b->buf, 72) && !memcmp(a->buf + 76, b->buf + 76, 4092 - 76) &&
           !memcmp(a->buf + 4096, b->buf + 4096, a->root_length - 4096);
}
#endif

int root_read_both(int fd, uint64_t file_size, lc_roots *roots)
{
    memset(roots, 0, sizeof *roots);
    roots->current = -1;
    int rc = root_read_copy(fd, file_size, 0, &roots->copy[0]);
    if (rc)
        return rc;
#ifdef BROKEN_IGNORE_SECOND_COPY
    /* Defect: the second copy is never read; it is taken to be the first. */
    roots->copy[1].status = COPY_VALID;
    if (roots->copy[0].status == COPY_UNSUPPORTED)
        roots->refused = 1;
    else if (roots->copy[0].status == COPY_VALID)
        roots->current = 0;
    return 0;
#else
    rc = root_read_copy(fd, file_size, 1, &roots->copy[1]);
    if (rc)
        return rc;
    lc_root *a = &roots->copy[0], *b = &roots->copy[1];
    if (a->status == COPY_UNSUPPORTED || b->status == COPY_UNSUPPORTED) {
        roots->refused = 1;
        return 0;
    }
    if (a->status == COPY_VALID && b->status == COPY_VALID) {
        roots->current = b->generation > a->generation ? 1 : 0;
        roots->other_stale = a->generation != b->generation || !twins_equal(a, b);
    } else if (a->status == COPY_VALID) {
        roots->current = 0;
    } else if (b->status == COPY_VALID) {
        roots->current = 1;
    }
    return 0;
#endif
}

void root_free(lc_roots *roots)
{
    for (int i = 0; i < 2; i++) {
        free(roots->copy[i].buf);
        free(roots->copy[i].snapshots);
        roots->copy[i].buf = NULL;
        roots->copy[i].snapshots = NULL;
    }
}
