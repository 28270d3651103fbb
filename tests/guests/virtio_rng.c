/*
 * Drives virtio-rng over virtio-mmio as a driver would: identify, negotiate
 * VERSION_1, set up queue 0, post one 64-byte device-writable buffer, notify,
 * wait for the used ring and the interrupt, ack it, and print
 * `RNG OK <len> <first 8 bytes in hex>` or `RNG FAIL <reason>`.
 */
#include "virtio.h"

#define RING_BASE 0x200000UL
#define BUF_ADDR 0x210000UL
#define BUF_LEN 64
#define QSIZE 8

static int fail(const char *why)
{
    print("RNG FAIL ");
    print(why);
    print("\n");
    vwrite(VIRTIO_MMIO_STATUS, vread(VIRTIO_MMIO_STATUS) | STATUS_FAILED);
    return 0; /* power off anyway: the test reads the verdict from the console */
}

int guest_main(void)
{
    struct vq q;
    const char *err = virtio_negotiate();
    if (err)
        return fail(err);

    vwrite(VIRTIO_MMIO_QUEUE_SEL, 0);
    u32 max = vread(VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max < QSIZE)
        return fail("QueueNumMax too small");
    if (vread(VIRTIO_MMIO_QUEUE_READY) != 0)
        return fail("queue ready before setup");

    vq_init(&q, RING_BASE, QSIZE);
    zero64(BUF_ADDR, BUF_LEN);
    virtio_setup_queue(QSIZE, (u64)q.desc, (u64)q.avail, (u64)q.used);
    if (vread(VIRTIO_MMIO_QUEUE_READY) != 1)
        return fail("QueueReady did not stick");
    u32 status = virtio_driver_ok();
    if (status != (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK))
        return fail("DRIVER_OK not accepted");

    q.desc[0].addr = BUF_ADDR;
    q.desc[0].len = BUF_LEN;
    q.desc[0].flags = VRING_DESC_F_WRITE;
    q.desc[0].next = 0;
    vq_push(&q, 0);
    vq_notify(0);

    if (!vq_wait_used(&q, 1, 100000))
        return fail("timeout waiting for the used ring");
    u32 id = q.used->ring[0].id;
    u32 len = q.used->ring[0].len;
    if (id != 0)
        return fail("used id is not 0");
    if (len != BUF_LEN)
        return fail("used len is not 64");

    /* The device signals after updating the used ring: allow it a moment. */
    u32 isr = 0;
    for (int i = 0; i < 10000 && !(isr & INT_VRING); i++)
        isr = vread(VIRTIO_MMIO_INTERRUPT_STATUS);
    if (!(isr & INT_VRING))
        return fail("no used-buffer interrupt in InterruptStatus");
    vwrite(VIRTIO_MMIO_INTERRUPT_ACK, isr);
    if (vread(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_VRING)
        return fail("InterruptACK did not clear the status");

    volatile u8 *buf = (volatile u8 *)BUF_ADDR;
    u8 any = 0;
    for (int i = 0; i < BUF_LEN; i++)
        any |= buf[i];
    if (!any)
        return fail("buffer is all zero");

    print("RNG OK ");
    put_dec(len);
    putch(' ');
    for (int i = 0; i < 8; i++)
        put_hex8(buf[i]);
    print("\n");
    virtio_reset();
    return 0;
}
