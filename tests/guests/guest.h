/*
 * Shared helpers for aivmm's freestanding test guests: port and MMIO access,
 * a polled COM1 writer, the boot-timer marker and the ACPI power-off/reset paths.
 *
 * Every guest instruction is emulated on the test host (~1 us each, ~10 us per
 * port or MMIO exit), so keep guests short: no big loops.
 */
#ifndef AIVMM_TEST_GUEST_H
#define AIVMM_TEST_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* Fixed platform addresses, from vmm/src/arch/x86_64/layout.rs. */
#define COM1 0x3f8
#define BOOT_TIMER 0xc0000000UL
#define ACPI_PM 0x600
#define ACPI_SLEEP_CONTROL (ACPI_PM + 0)
#define ACPI_RESET (ACPI_PM + 2)
#define ACPI_S5 5
#define ACPI_SLP_EN (1 << 5)
#define I8042_COMMAND 0x64

int guest_main(void);

/* The entry point: call guest_main; power off if it returns 0, halt otherwise
 * (a halt with interrupts off makes aivmm fail). aivmm stops the VM from another
 * thread, so the vCPU may run on for a moment after a power-off or reset write:
 * spin rather than run into anything that could print or fault. */
__asm__(".section .text.start, \"ax\"\n"
        ".global _start\n"
        "_start:\n"
        "    cld\n"
        "    call guest_main\n"
        "    test %eax, %eax\n"
        "    jnz 2f\n"
        "    mov $0x600, %dx\n"
        "    mov $0x34, %al\n" /* SLP_TYP = S5 (5 << 2) | SLP_EN (1 << 5) */
        "    out %al, %dx\n"
        "1:  pause\n"
        "    jmp 1b\n"
        "2:  hlt\n"
        "    jmp 2b\n"
        ".previous\n");

#define barrier() __asm__ __volatile__("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *d, int c, u64 n)
{
    volatile u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    volatile u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* Zeroes `n` bytes (a multiple of 8) at the 8-byte aligned address `a`. */
static inline void zero64(u64 a, u64 n)
{
    for (u64 i = 0; i < n; i += 8)
        *(volatile u64 *)(a + i) = 0;
}

/* The aivmm serial model accepts THR writes at once: no LSR polling needed. */
static inline void putch(char c) { outb(COM1, (u8)c); }

static inline void print(const char *s)
{
    while (*s)
        putch(*s++);
}

static inline void put_hex8(u8 v)
{
    static const char digits[] = "0123456789abcdef";
    putch(digits[v >> 4]);
    putch(digits[v & 0xf]);
}

static inline void put_hex(u64 v)
{
    int started = 0;
    print("0x");
    for (int shift = 60; shift >= 0; shift -= 4) {
        u8 d = (v >> shift) & 0xf;
        if (d || started || shift == 0) {
            putch("0123456789abcdef"[d]);
            started = 1;
        }
    }
}

static inline void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    print(&buf[i]);
}

/* Logs `aivmm: boot-timer: guest marker <v> …` on aivmm's stderr. */
static inline void boot_marker(u32 v) { mmio_write32(BOOT_TIMER, v); }

/* Time passes on the host between MMIO exits; a pause between polls is cheap. */
static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }

/* Waits for aivmm to stop the VM after a power-off or reset write. If it never
 * does, the harness's timeout fails the test. */
static inline __attribute__((noreturn)) void wait_for_stop(void)
{
    for (;;)
        cpu_relax();
}

static inline __attribute__((noreturn)) void acpi_power_off(void)
{
    outb(ACPI_SLEEP_CONTROL, (ACPI_S5 << 2) | ACPI_SLP_EN);
    wait_for_stop();
}

static inline __attribute__((noreturn)) void acpi_reset(void)
{
    outb(ACPI_RESET, 1);
    wait_for_stop();
}

static inline __attribute__((noreturn)) void i8042_reset(void)
{
    outb(I8042_COMMAND, 0xfe);
    wait_for_stop();
}

#endif
