/* Prints a line, writes boot-timer marker 42, then powers off through ACPI S5. */
#include "guest.h"

int guest_main(void)
{
    print("hello from the aivmm test guest\n");
    boot_marker(42);
    acpi_power_off();
}
