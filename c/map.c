/* map.c: reading, judging and selecting a region's two map copies
 * (FORMAT.md section 4, F-MAP-001 and F-MAP-002). */
#include "lamina.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t MAP_MAGIC[8] = {0x8a, 'L', 'A', 'M', 'M', 'A', 'P', '\n'};

static void judge_map(lc_mapcopy *m, const lc_geometry *g, const uint8_t *image_uuid,
                      uint64_t region, uint32_t position, int shared_layer)
{
    const uint8_t *b = m->buf;
    m->zeroed = all_zero(b, g->map_used);
    m->status = COPY_VALID;
    m->used = (uint32_t)g->map_used;
    if (memcmp(b, MAP_MAGIC, 8) != 0) {
        m->status = COPY_BAD_MAGIC;
        snprintf(m->why, sizeof m->why, m->zeroed ? "copy is zeroed" : "bad magic");
        return;
    }
    /* F-MAP-001, F-SHARE-002: the table is part of the used length when the
     * copy's flags bit 0 is set and the root sets shared-clusters. */
    uint32_t flags = get_u32(b + 40);
    m->has_table = shared_layer && (flags & MAP_FLAG_SHARED);
    if (m->has_table)
        m->used += SHARED_TABLE_SIZE;
    uint32_t stored = get_u32(b + 60);
    uint32_t crc = crc32c(0, b, 60);
    static const uint8_t zero4[4];
    crc = crc32c(crc, zero4, 4);
    crc = crc32c(crc, b + 64, m->used - 64);
#ifndef BROKEN_TRUST_CRC
    if (crc != stored) {
        m->status = COPY_BAD_CHECKSUM;
        snprintf(m->why, sizeof m->why, "CRC32C does not match its contents");
        return;
    }
#else
    (void)stored;
#endif
    m->generation = get_u64(b + 16);
    if (m->generation < 1 || m->generation > MAX_COUNTER) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "generation %llu out of range",
                 (unsigned long long)m->generation);
    } else if (flags & ~MAP_FLAG_SHARED) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "unknown flags 0x%x", flags);
    } else if ((flags & MAP_FLAG_SHARED) && !shared_layer) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "flags bit 0 (shared table) in a layer without shared-clusters");
    } else if (!all_zero(b + 44, 16)) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "reserved bytes are not zero");
    } else if (get_u32(b + 12) > 1) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "slot %u is not 0 or 1", get_u32(b + 12));
    } else if (get_u32(b + 8) != region || get_u32(b + 12) != position) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "holds region %u slot %u (misdirected)", get_u32(b + 8),
                 get_u32(b + 12));
    } else if (memcmp(b + 24, image_uuid, 16) != 0) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "image_uuid is not the root's");
    }
}

static int map_twins_equal(const lc_mapcopy *a, const lc_mapcopy *b)
{
    size_t used = a->used;
    if (a->used != b->used)
        return 0;
    return !memcmp(a->buf, b->buf, 12) && !memcmp(a->buf + 16, b->buf + 16, 60 - 16) &&
           !memcmp(a->buf + 64, b->buf + 64, used - 64);
}

static int read_copy(int fd, uint64_t file_size, const lc_geometry *g, const uint8_t *image_uuid,
                     uint64_t region, uint32_t position, int shared_layer, lc_mapcopy *m)
{
    /* the table's place is read too; it always fits the map cluster */
    size_t len = g->map_used + SHARED_TABLE_SIZE;
    uint64_t off = g->first_region_offset + region * g->region_stride +
                   (position ? (REGION_STRIDE_CLUSTERS - 1) * g->cluster_size : 0);
    m->buf = malloc(len);
    if (!m->buf)
        return lc_fail(LC_ERROR, "out of memory");
    if (pread_full(fd, m->buf, len, off) < 0)
        return lc_fail(LC_ERROR, "cannot read map copy %c of region %llu: I/O error",
                       'A' + position, (unsigned long long)region);
    if (off < file_size && file_size < off + g->map_used) {
        /* cut short by the file's end: invalid, never "zeroed" */
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "the file ends inside the copy");
        return 0;
    }
    judge_map(m, g, image_uuid, region, position, shared_layer);
    if (m->status == COPY_VALID && m->has_table && off < file_size && file_size < off + m->used) {
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "the file ends inside the copy's shared table");
    }
    return 0;
}

int map_read_both(int fd, uint64_t file_size, const lc_geometry *g, const uint8_t *image_uuid,
                  int shared_layer, uint64_t region, lc_maps *maps)
{
    memset(maps, 0, sizeof *maps);
    int rc = read_copy(fd, file_size, g, image_uuid, region, 0, shared_layer, &maps->copy[0]);
    if (rc)
        return rc;
    lc_mapcopy *a = &maps->copy[0], *b = &maps->copy[1];
#ifdef BROKEN_IGNORE_SECOND_COPY
    /* Defect: copy B is never read; it is taken to be copy A. */
    b->buf = malloc(g->map_used + SHARED_TABLE_SIZE);
    if (!b->buf)
        return lc_fail(LC_ERROR, "out of memory");
    memcpy(b->buf, a->buf, g->map_used + SHARED_TABLE_SIZE);
    b->used = a->used;
    b->has_table = a->has_table;
    b->status = a->status;
    b->zeroed = a->zeroed;
    b->generation = a->generation;
#else
    rc = read_copy(fd, file_size, g, image_uuid, region, 1, shared_layer, b);
    if (rc)
        return rc;
#endif
    if (a->status == COPY_VALID && b->status == COPY_VALID) {
        maps->state = MAP_CURRENT;
        maps->current = b->generation > a->generation ? 1 : 0;
        maps->other_stale =
            a->generation != b->generation || !map_twins_equal(a, b);
    } else if (a->status == COPY_VALID || b->status == COPY_VALID) {
        maps->state = MAP_CURRENT;
        maps->current = a->status == COPY_VALID ? 0 : 1;
    } else if (a->zeroed || b->zeroed) {
        maps->state = MAP_NEVER_WRITTEN;
    } else {
        maps->state = MAP_NO_VALID_COPY;
    }
    return 0;
}

void map_free(lc_maps *maps)
{
    free(maps->copy[0].buf);
    free(maps->copy[1].buf);
    maps->copy[0].buf = maps->copy[1].buf = NULL;
}

int map_present(const uint8_t *map, uint64_t sector)
{
    return (map[MAP_BITMAP_OFFSET + sector / 8] >> (sector % 8)) & 1;
}

/* F-SHARE-002: 0 when data cluster c of the copy is local, else 1 + the
 * index of the store cluster holding it. */
uint64_t map_shared_ref(const lc_mapcopy *m, const lc_geometry *g, uint64_t c)
{
    if (!m->has_table)
        return 0;
    return get_u64(m->buf + g->map_used + 8 * c);
}
