"""sensorseal.device."""
