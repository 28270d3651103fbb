# aivmm guest: the image is rebuilt, not updated in place.
export DISABLE_AUTOUPDATER=1
