"""sensorseal.keystore."""
