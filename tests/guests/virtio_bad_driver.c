/*
 * A hostile virtio-mmio driver. aivmm must neither crash nor hang, and must
 * refuse the queue set-ups that are invalid:
 *  - register accesses of 1, 2 and 8 bytes, misaligned, past the window end;
 *  - queue sizes that are not a power of two, zero or too big, and rings outside
 *    guest RAM (each must leave DEVICE_NEEDS_RESET set, without DRIVER_OK taking);
 *  - on a working queue: buffers past guest RAM, a descriptor chain that loops,
 *    a bogus indirect table, a read-only buffer, a huge length, a head index
 *    past the ring and an avail index far ahead.
 * Then it resets the device (which joins the device's worker thread: a worker
 * stuck in a loop would hang here), checks that a normal request still works
 * (`RECOVERED <len>`), prints `SURVIVED` and powers off. Lines beginning with
 * `CHECK FAIL` mark a refused set-up that was accepted.
 */
#include "virtio.h"

#define RING_BASE 0x200000UL
#define BUF_ADDR 0x210000UL
#define QSIZE 8
#define FAR_AWAY 0x700000000UL /* 28 GiB: far past the 128 MiB of RAM */
#define END_OF_RAM 0x8000000UL /* with --memory 128M */
#define WAIT_ROUNDS 20000

static void check(int ok, const char *what)
{
    print(ok ? "CHECK ok " : "CHECK FAIL ");
    print(what);
    print("\n");
}

/* `CHECK ok <what> <n> <rest>` */
static void check_n(int ok, const char *what, u64 n, const char *rest)
{
    print(ok ? "CHECK ok " : "CHECK FAIL ");
    print(what);
    putch(' ');
    put_dec(n);
    putch(' ');
    print(rest);
    print("\n");
}

static void odd_widths(void)
{
    u64 b = VIRTIO_BASE;
    u64 acc = 0;
    acc += mmio_read8(b + VIRTIO_MMIO_MAGIC_VALUE);
    acc += mmio_read16(b + VIRTIO_MMIO_VERSION);
    acc += mmio_read64(b + VIRTIO_MMIO_MAGIC_VALUE);
    acc += mmio_read8(b + VIRTIO_MMIO_STATUS + 3);
    acc += *(volatile u32 *)(b + VIRTIO_MMIO_MAGIC_VALUE + 2); /* misaligned */
    mmio_write8(b + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write16(b + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    mmio_write64(b + VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE);
    *(volatile u32 *)(b + VIRTIO_MMIO_STATUS + 1) = STATUS_ACKNOWLEDGE;
    check(vread(VIRTIO_MMIO_STATUS) == 0, "narrow/wide/misaligned status writes ignored");
    /* Narrow notifies miss the 4-byte ioeventfd and reach the transport. */
    mmio_write8(b + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    mmio_write16(b + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    mmio_write64(b + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    vwrite(VIRTIO_MMIO_QUEUE_NOTIFY, 0xffffffff);
    /* Unknown registers, the config space and the end of the window. */
    vwrite(0x0c8, 0xffffffff);
    acc += vread(0x0c8);
    mmio_write8(b + VIRTIO_MMIO_CONFIG, 0xff);
    acc += mmio_read8(b + VIRTIO_MMIO_CONFIG);
    acc += mmio_read8(b + 0xfff);
    mmio_write8(b + 0xfff, 0xff);
    acc += *(volatile u32 *)(b + 0xffe); /* straddles the window's end */
    *(volatile u32 *)(b + 0xffe) = 0xffffffff;
    acc += mmio_read64(b + 0xffc);
    /* The next window has no device. */
    acc += mmio_read32(b + 0x1000);
    mmio_write32(b + 0x1000 + VIRTIO_MMIO_STATUS, 0xff);
    print("widths done ");
    put_hex(acc);
    print("\n");
}

/* Sets up queue 0 with the given size and rings; returns the status after DRIVER_OK. */
static u32 try_queue(u32 size, u64 desc, u64 driver, u64 device)
{
    const char *err = virtio_negotiate();
    if (err) {
        print("negotiation failed: ");
        print(err);
        print("\n");
        return 0;
    }
    virtio_setup_queue(size, desc, driver, device);
    u32 status = virtio_driver_ok();
    /* Kick the refused queue anyway. */
    vq_notify(0);
    return status;
}

static void refused_setups(void)
{
    static const u32 sizes[] = { 3, 0, 6, 512, 0x10008 };
    for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        u32 s = try_queue(sizes[i], RING_BASE, RING_BASE + 0x1000, RING_BASE + 0x2000);
        print("status ");
        put_hex(s);
        print("\n");
        check_n(s & STATUS_NEEDS_RESET, "queue size", sizes[i], "refused");
        /* Writes after the refusal must not revive the queue. */
        vwrite(VIRTIO_MMIO_QUEUE_NUM, 8);
        vwrite(VIRTIO_MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        check(vread(VIRTIO_MMIO_STATUS) & STATUS_NEEDS_RESET, "refused device stays refused");
        check(virtio_reset(), "reset after refusal");
    }
    static const u64 rings[][3] = {
        { FAR_AWAY, RING_BASE + 0x1000, RING_BASE + 0x2000 },
        { RING_BASE, FAR_AWAY, RING_BASE + 0x2000 },
        { RING_BASE, RING_BASE + 0x1000, VIRTIO_BASE },     /* the device's own window */
        { END_OF_RAM - 64, RING_BASE + 0x1000, RING_BASE + 0x2000 }, /* straddles the end */
        { RING_BASE + 1, RING_BASE + 0x1000, RING_BASE + 0x2000 },   /* misaligned */
        { 0xfffffffffffff000UL, RING_BASE + 0x1000, RING_BASE + 0x2000 },
    };
    for (unsigned i = 0; i < sizeof(rings) / sizeof(rings[0]); i++) {
        u32 s = try_queue(QSIZE, rings[i][0], rings[i][1], rings[i][2]);
        print("status ");
        put_hex(s);
        print("\n");
        check_n(s & STATUS_NEEDS_RESET, "bad rings", i, "refused");
        check(virtio_reset(), "reset after refusal");
    }
}

/* Posts `head`, notifies and reports what came back on the used ring. */
static void post(struct vq *q, const char *name, u16 head)
{
    u16 before = q->used->idx;
    vq_push(q, head);
    vq_notify(0);
    print("case ");
    print(name);
    u32 i;
    for (i = 0; i < WAIT_ROUNDS; i++) {
        barrier();
        if (q->used->idx != before)
            break;
        (void)vread(VIRTIO_MMIO_INTERRUPT_STATUS);
    }
    barrier();
    u16 now = q->used->idx;
    if (now == before) {
        print(": no completion\n");
        return;
    }
    volatile struct vring_used_elem *e = &q->used->ring[before % q->size];
    print(": used id ");
    put_dec(e->id);
    print(" len ");
    put_dec(e->len);
    print("\n");
}

static void set_desc(struct vq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

static void hostile_requests(void)
{
    struct vq q;
    vq_init(&q, RING_BASE, QSIZE);
    const char *err = virtio_negotiate();
    if (err) {
        print("negotiation failed: ");
        print(err);
        print("\n");
        return;
    }
    virtio_setup_queue(QSIZE, (u64)q.desc, (u64)q.avail, (u64)q.used);
    u32 s = virtio_driver_ok();
    check(s == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
          "valid queue accepted");

    set_desc(&q, 0, FAR_AWAY, 64, VRING_DESC_F_WRITE, 0);
    post(&q, "buffer past RAM", 0);
    set_desc(&q, 1, BUF_ADDR, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
    post(&q, "self loop", 1);
    set_desc(&q, 2, BUF_ADDR, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3);
    set_desc(&q, 3, BUF_ADDR + 16, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
    post(&q, "two-descriptor loop", 2);
    set_desc(&q, 4, FAR_AWAY, 32, VRING_DESC_F_INDIRECT, 0);
    post(&q, "indirect table past RAM", 4);
    set_desc(&q, 4, BUF_ADDR + 0x100, 0x7fff0, VRING_DESC_F_INDIRECT, 0);
    post(&q, "huge indirect table", 4);
    set_desc(&q, 5, END_OF_RAM - 16, 0xffffffff, VRING_DESC_F_WRITE, 0);
    post(&q, "huge length at end of RAM", 5);
    set_desc(&q, 6, 0xfffffffffffffff0UL, 64, VRING_DESC_F_WRITE, 0);
    post(&q, "address wraps", 6);
    set_desc(&q, 7, BUF_ADDR, 64, 0, 0);
    post(&q, "read-only buffer", 7);
    set_desc(&q, 0, BUF_ADDR, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 200);
    post(&q, "next index past ring", 0);
    post(&q, "head index past ring", 200);
    /* An avail index far ahead of what was posted. */
    q.avail_idx += 0x8000;
    q.avail->idx = q.avail_idx;
    vq_notify(0);
    for (int i = 0; i < 100; i++)
        (void)vread(VIRTIO_MMIO_INTERRUPT_STATUS);
    print("avail index jump done\n");
}

static void recover(void)
{
    struct vq q;
    /* Reset joins the device's worker: a worker stuck in a loop hangs us here. */
    check(virtio_reset(), "reset after hostile requests");
    vq_init(&q, RING_BASE, QSIZE);
    zero64(BUF_ADDR, 64);
    const char *err = virtio_negotiate();
    if (err) {
        print("RECOVER FAIL ");
        print(err);
        print("\n");
        return;
    }
    virtio_setup_queue(QSIZE, (u64)q.desc, (u64)q.avail, (u64)q.used);
    if (virtio_driver_ok() & STATUS_NEEDS_RESET) {
        print("RECOVER FAIL activation refused\n");
        return;
    }
    set_desc(&q, 0, BUF_ADDR, 64, VRING_DESC_F_WRITE, 0);
    vq_push(&q, 0);
    vq_notify(0);
    if (!vq_wait_used(&q, 1, 100000)) {
        print("RECOVER FAIL no completion\n");
        return;
    }
    print("RECOVERED ");
    put_dec(q.used->ring[0].len);
    print("\n");
    virtio_reset();
}

int guest_main(void)
{
    odd_widths();
    refused_setups();
    hostile_requests();
    recover();
    print("SURVIVED\n");
    return 0;
}
