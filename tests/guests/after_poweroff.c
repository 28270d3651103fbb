/* Keeps printing after the ACPI S5 write: aivmm must not run it any further. */
#include "guest.h"

int guest_main(void)
{
    print("powering off\n");
    outb(0x600, (5 << 2) | (1 << 5));
    for (int i = 0; i < 20; i++)
        print("still running after S5\n");
    return 1;
}
