/* Prints a Linux kernel panic line and spins for ever, as a guest with panic=0
 * (or whose reset never arrives) does: aivmm must stop it and name the panic. */
#include "guest.h"

int guest_main(void)
{
    print("Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n");
    for (;;)
        __asm__ __volatile__("pause");
}
