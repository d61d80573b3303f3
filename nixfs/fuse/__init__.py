"""The FUSE side of nixfs: the only part that imports pyfuse3.

The overlay model (nixfs/overlay/) answers in its own types and never sees pyfuse3; this
package translates between the two (``ops``), tells the kernel what the model changed
behind its back (``notifier``), refreshes attributes the kernel marks stale
(``stale_attrs``), and asks once which features of nixfs' pyfuse3 patch series the
installed pyfuse3 has (``features``).
"""
