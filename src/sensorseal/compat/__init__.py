"""Other systems' wire formats, for fleets that cannot be re-flashed.

Each module is a thin, pure translation (bytes and secrets in, a checked result or `Rejected`
out; time passed in) so that the pipeline can put every legacy message through the same replay,
policy and audit steps as the native envelope:

* `valarm`    — HMAC-MD5 / HMAC-SHA256 signed JSON over HTTP (format defined here)
* `yoctopuce` — YoctoHub / VirtualHub "Yocto-API" callbacks with their salted-MD5 signature
* `waspmote`  — Libelium Waspmote frames, plain and AES-ECB encrypted (Meshlium stand-in)

What each supports, and how weak each is, is in docs/compat.md.
"""

from sensorseal.compat import valarm, waspmote, yoctopuce

__all__ = ["valarm", "waspmote", "yoctopuce"]
