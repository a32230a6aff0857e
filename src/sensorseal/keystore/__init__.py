"""sensorseal.keystore: where device secrets are protected (software KEK; PKCS#11 later)."""

from sensorseal.keystore.base import Keystore
from sensorseal.keystore.software import SoftwareKeystore, create_kek_file, load_kek

__all__ = ["Keystore", "SoftwareKeystore", "create_kek_file", "load_kek"]
