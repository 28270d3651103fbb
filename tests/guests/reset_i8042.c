/* Resets through the i8042 controller (command 0xfe): aivmm stops, exit 0. */
#include "guest.h"

int guest_main(void)
{
    print("resetting via i8042\n");
    i8042_reset();
}
