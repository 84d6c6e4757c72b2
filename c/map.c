/* map.c: reading, judging and selecting a region's two map copies
 * (FORMAT.md section 4, F-MAP-001 and F-MAP-002). */
#include "lamina.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t MAP_MAGIC[8] = {0x8a, 'L', 'A', 'M', 'M', 'A', 'P', '\n'};

static void judge_map(lc_mapcopy *m, const lc_geometry *g, const uint8_t *image_uuid,
                      uint64_t region, uint32_t position)
{
    const uint8_t *b = m->buf;
    m->zeroed = all_zero(b, g->map_used);
    m->status = COPY_VALID;
    if (memcmp(b, MAP_MAGIC, 8) != 0) {
        m->status = COPY_BAD_MAGIC;
        snprintf(m->why, sizeof m->why, m->zeroed ? "copy is zeroed" : "bad magic");
        return;
    }
    uint32_t stored = get_u32(b + 60);
    uint32_t crc = crc32c(0, b, 60);
    static const uint8_t zero4[4];
    crc = crc32c(crc, zero4, 4);
    crc = crc32c(crc, b + 64, g->map_used - 64);
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
    } else if (!all_zero(b + 40, 20)) {
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

static int map_twins_equal(const lc_mapcopy *a, const lc_mapcopy *b, size_t used)
{
    return !memcmp(a->buf, b->buf, 12) && !memcmp(a->buf + 16, b->buf + 16, 60 - 16) &&
           !memcmp(a->buf + 64, b->buf + 64, used - 64);
}

static int read_copy(int fd, uint64_t file_size, const lc_geometry *g, const uint8_t *image_uuid,
                     uint64_t region, uint32_t position, lc_mapcopy *m)
{
    uint64_t off = g->first_region_offset + region * g->region_stride +
                   (position ? (REGION_STRIDE_CLUSTERS - 1) * g->cluster_size : 0);
    m->buf = malloc(g->map_used);
    if (!m->buf)
        return lc_fail(LC_ERROR, "out of memory");
    if (pread_full(fd, m->buf, g->map_used, off) < 0)
        return lc_fail(LC_ERROR, "cannot read map copy %c of region %llu: I/O error",
                       'A' + position, (unsigned long long)region);
    if (off < file_size && file_size < off + g->map_used) {
        /* cut short by the file's end: invalid, never "zeroed" */
        m->status = COPY_OUT_OF_RANGE;
        snprintf(m->why, sizeof m->why, "the file ends inside the copy");
        return 0;
    }
    judge_map(m, g, image_uuid, region, position);
    return 0;
}

int map_read_both(int fd, uint64_t file_size, const lc_geometry *g, const uint8_t *image_uuid,
                  uint64_t region, lc_maps *maps)
{
    memset(maps, 0, sizeof *maps);
    int rc = read_copy(fd, file_size, g, image_uuid, region, 0, &maps->copy[0]);
    if (rc)
        return rc;
    lc_mapcopy *a = &maps->copy[0], *b = &maps->copy[1];
#ifdef BROKEN_IGNORE_SECOND_COPY
    /* Defect: copy B is never read; it is taken to be copy A. */
    b->buf = malloc(g->map_used);
    if (!b->buf)
        return lc_fail(LC_ERROR, "out of memory");
    memcpy(b->buf, a->buf, g->map_used);
    b->status = a->status;
    b->zeroed = a->zeroed;
    b->generation = a->generation;
#else
    rc = read_copy(fd, file_size, g, image_uuid, region, 1, b);
    if (rc)
        return rc;
#endif
    if (a->status == COPY_VALID && b->status == COPY_VALID) {
        maps->state = MAP_CURRENT;
        maps->current = b->generation > a->generation ? 1 : 0;
        maps->other_stale =
            a->generation != b->generation || !map_twins_equal(a, b, g->map_used);
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
