"""The ground floor: the vocabulary every other floor speaks.

`Config` and `ConfigKey` (one object of the store and its identity), the kind names,
and the store snapshot that pushes read. Nothing here imports another meshpilot
package; api/, model/, discovery/, translators/ and xds/ all import from here.
"""

from meshpilot.config.objects import Config, ConfigKey, age_key, oldest_first
from meshpilot.config.snapshot import StoreSnapshot

__all__ = ["Config", "ConfigKey", "StoreSnapshot", "age_key", "oldest_first"]
