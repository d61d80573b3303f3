"""``nixfs fsck``: the check (and repair) of an unmounted upper, in parts of one job each.

``run`` takes the upper as a daemon would and runs the checks; ``report`` holds
what they found and did; ``tree`` checks the upper's format beside the lower,
``statedir`` nixfs' own folder, ``db`` the merged Nix database against the files;
``upper`` is how they all look at and repair the upper; ``progress`` shows how far
a long run got.
"""
