/* Prints a Linux kernel panic line and resets, as a guest with panic=-1 does:
 * aivmm must exit non-zero and name the panic. */
#include "guest.h"

int guest_main(void)
{
    print("[    1.5] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300\r\n");
    print("[    1.5] ---[ end trace ]---\r\n");
    i8042_reset();
}
