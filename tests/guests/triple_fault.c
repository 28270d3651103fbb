/* Loads an empty IDT and raises #UD: #UD -> #GP -> #DF -> triple fault. */
#include "guest.h"

int guest_main(void)
{
    static const struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } null_idt = { 0, 0 };

    print("triple faulting\n");
    __asm__ __volatile__("lidt %0\n\tud2" : : "m"(null_idt));
    print("FAIL: survived ud2 with an empty IDT\n");
    return 0;
}
