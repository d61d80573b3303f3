"""The one gate every FUSE handler's answer passes: only ``FUSEError`` reaches pyfuse3.

Any other exception escaping a handler would end the mount, so the gate turns an
``OSError`` from the model into its errno, and logs anything else and answers EIO. It also
counts each request by handler name (``nixfs status`` shows the counts).
"""

import errno
import functools
import logging

import pyfuse3

log = logging.getLogger(__name__)


def translate(fn):
    """Wrap the handler *fn* of an object with ``requests`` (a Counter) and ``errors``."""
    @functools.wraps(fn)
    async def handler(self, *args):
        self.requests[fn.__name__] += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args)
            self.errors += 1
            raise pyfuse3.FUSEError(errno.EIO) from None
    return handler
