/*
 * A minimal polled virtio-mmio (version 2) driver for the test guests:
 * register offsets (virtio 1.2 §4.2.2), split-ring layout (§2.7) and the
 * initialisation sequence (§3.1.1), with every step checked.
 */
#ifndef AIVMM_TEST_VIRTIO_H
#define AIVMM_TEST_VIRTIO_H

#include "guest.h"

/* The first virtio-mmio window (layout.rs); aivmm puts virtio-rng there. */
#define VIRTIO_BASE 0xd0000000UL

#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_ID_RNG 4

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 0x40
#define STATUS_FAILED 0x80

/* VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the high feature word. */
#define FEATURE_HI_VERSION_1 1

#define INT_VRING 1
#define INT_CONFIG 2

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[];
};

/* Where a queue's rings live in guest RAM: one page each, well clear of the
 * guest image at 1 MiB and the boot structures below it. */
struct vq {
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u16 size;
    u16 avail_idx; /* our shadow of avail->idx */
};

static inline u32 vread(u32 off) { return mmio_read32(VIRTIO_BASE + off); }
static inline void vwrite(u32 off, u32 v) { mmio_write32(VIRTIO_BASE + off, v); }

static inline void vwrite64(u32 lo, u64 v)
{
    vwrite(lo, (u32)v);
    vwrite(lo + 4, (u32)(v >> 32));
}

/* Lays out a queue of `size` entries at `base` (three pages) and zeroes its rings. */
static inline void vq_init(struct vq *q, u64 base, u16 size)
{
    q->desc = (volatile struct vring_desc *)base;
    q->avail = (volatile struct vring_avail *)(base + 0x1000);
    q->used = (volatile struct vring_used *)(base + 0x2000);
    q->size = size;
    q->avail_idx = 0;
    zero64(base, ((u64)size * 16 + 7) & ~7UL);
    zero64(base + 0x1000, ((u64)size * 2 + 6 + 7) & ~7UL);
    zero64(base + 0x2000, ((u64)size * 8 + 6 + 7) & ~7UL);
}

/* Resets the device and checks that the reset took. */
static inline int virtio_reset(void)
{
    vwrite(VIRTIO_MMIO_STATUS, 0);
    return vread(VIRTIO_MMIO_STATUS) == 0;
}

/* Steps 1-6 of §3.1.1 up to FEATURES_OK for device `id`, accepting VERSION_1
 * and the low feature bits `lo`. Returns a reason on failure, 0 on success. */
static inline const char *virtio_negotiate_dev(u32 id, u32 lo)
{
    if (vread(VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MAGIC)
        return "bad magic";
    if (vread(VIRTIO_MMIO_VERSION) != 2)
        return "version is not 2";
    if (vread(VIRTIO_MMIO_DEVICE_ID) != id)
        return "unexpected device id";
    if (!virtio_reset())
        return "reset did not clear status";
    vwrite(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    vwrite(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    vwrite(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    if (!(vread(VIRTIO_MMIO_DEVICE_FEATURES) & FEATURE_HI_VERSION_1))
        return "no VIRTIO_F_VERSION_1";
    vwrite(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    if ((vread(VIRTIO_MMIO_DEVICE_FEATURES) & lo) != lo)
        return "a wanted feature is not offered";
    vwrite(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vwrite(VIRTIO_MMIO_DRIVER_FEATURES, lo);
    vwrite(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vwrite(VIRTIO_MMIO_DRIVER_FEATURES, FEATURE_HI_VERSION_1);
    vwrite(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(vread(VIRTIO_MMIO_STATUS) & STATUS_FEATURES_OK))
        return "FEATURES_OK not kept";
    return 0;
}

/* virtio_negotiate_dev for the rng device with VERSION_1 only. */
static inline const char *virtio_negotiate(void)
{
    return virtio_negotiate_dev(VIRTIO_ID_RNG, 0);
}

/* Programs queue 0 with the given size and ring addresses and marks it ready. */
static inline void virtio_setup_queue(u32 size, u64 desc, u64 driver, u64 device)
{
    vwrite(VIRTIO_MMIO_QUEUE_SEL, 0);
    vwrite(VIRTIO_MMIO_QUEUE_NUM, size);
    vwrite64(VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
    vwrite64(VIRTIO_MMIO_QUEUE_DRIVER_LOW, driver);
    vwrite64(VIRTIO_MMIO_QUEUE_DEVICE_LOW, device);
    vwrite(VIRTIO_MMIO_QUEUE_READY, 1);
}

/* Sets DRIVER_OK and returns the status the device shows afterwards. */
static inline u32 virtio_driver_ok(void)
{
    vwrite(VIRTIO_MMIO_STATUS,
           STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    return vread(VIRTIO_MMIO_STATUS);
}

/* Publishes descriptor `head` in the available ring (without notifying). */
static inline void vq_push(struct vq *q, u16 head)
{
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier(); /* x86 keeps stores in order; stop the compiler reordering them. */
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
    barrier();
}

static inline void vq_notify(u32 queue) { vwrite(VIRTIO_MMIO_QUEUE_NOTIFY, queue); }

/* Waits until used->idx reaches `want`. The device works on a host thread, so
 * each round reads InterruptStatus: an MMIO exit (~10 us) that lets real time
 * pass. Gives up after `rounds` reads. Returns 1 if it got there. */
static inline int vq_wait_used(struct vq *q, u16 want, u32 rounds)
{
    for (u32 i = 0; i < rounds; i++) {
        barrier();
        if (q->used->idx == want)
            return 1;
        (void)vread(VIRTIO_MMIO_INTERRUPT_STATUS);
    }
    barrier();
    return q->used->idx == want;
}

#endif
