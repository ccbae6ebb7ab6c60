"""
``python -m regcache``: the same as the ``regcache`` command.
"""

from regcache.tap import main

main()
