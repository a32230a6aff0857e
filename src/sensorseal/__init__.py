"""sensorseal: end-to-end security for sensor data and device control."""

__version__ = "0.1.0"
