/*
 * Writes 8 sectors of a known pattern through virtio-blk, flushes, prints
 * `FLUSHED`, then halts for ever: the test kills aivmm with SIGKILL and checks
 * that the acknowledged, flushed data is in the image file.
 */
#include "virtio.h"

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_BLK_F_FLUSH (1u << 9)
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define RING_BASE 0x200000UL
#define HDR_ADDR 0x210000UL
#define STATUS_ADDR 0x210100UL
#define DATA_ADDR 0x211000UL
#define DATA_LEN 4096
#define QSIZE 8

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static int fail(const char *why)
{
    print("BLK FAIL ");
    print(why);
    print("\n");
    return 0;
}

/* Sends one request (header, optional data, status) and waits for it. */
static const char *request(struct vq *q, u32 type, u64 sector, int with_data)
{
    volatile struct blk_req *h = (volatile struct blk_req *)HDR_ADDR;
    volatile u8 *status = (volatile u8 *)STATUS_ADDR;
    h->type = type;
    h->reserved = 0;
    h->sector = sector;
    *status = 0xff;
    u16 d = 0;
    q->desc[d].addr = HDR_ADDR;
    q->desc[d].len = sizeof(struct blk_req);
    q->desc[d].flags = VRING_DESC_F_NEXT;
    q->desc[d].next = d + 1;
    d++;
    if (with_data) {
        q->desc[d].addr = DATA_ADDR;
        q->desc[d].len = DATA_LEN;
        q->desc[d].flags = VRING_DESC_F_NEXT;
        q->desc[d].next = d + 1;
        d++;
    }
    q->desc[d].addr = STATUS_ADDR;
    q->desc[d].len = 1;
    q->desc[d].flags = VRING_DESC_F_WRITE;
    q->desc[d].next = 0;
    u16 want = q->avail_idx + 1;
    vq_push(q, 0);
    vq_notify(0);
    if (!vq_wait_used(q, want, 200000))
        return "timeout waiting for the used ring";
    if (*status != 0)
        return "request status is not OK";
    return 0;
}

int guest_main(void)
{
    struct vq q;
    const char *err = virtio_negotiate_dev(VIRTIO_ID_BLOCK, VIRTIO_BLK_F_FLUSH);
    if (err)
        return fail(err);
    vq_init(&q, RING_BASE, QSIZE);
    virtio_setup_queue(QSIZE, (u64)q.desc, (u64)q.avail, (u64)q.used);
    virtio_driver_ok();

    static const char pat[] = "AIVMM-DURABLE-";
    volatile u8 *data = (volatile u8 *)DATA_ADDR;
    for (u32 i = 0; i < DATA_LEN; i++)
        data[i] = (i % 16 < sizeof(pat) - 1) ? (u8)pat[i % 16] : (u8)('0' + i / 16 % 10);
    if ((err = request(&q, VIRTIO_BLK_T_OUT, 8, 1)))
        return fail(err);
    if ((err = request(&q, VIRTIO_BLK_T_FLUSH, 0, 0)))
        return fail(err);
    print("FLUSHED\n");
    for (;;)
        __asm__ volatile("hlt");
}
