"""One keyframe map shared by a fleet of robots, kept in Milvus (a server or cluster; Milvus Lite embedded).

Robots push the keyframes they record (:mod:`.push`) and pull the region they need into their local map
(:meth:`.store.FleetStore.pull`); the local map stays the source of truth, so a robot keeps working when the network
does not. Modules: :mod:`.config` (settings, names), :mod:`.region` (what a pull selects), :mod:`.records` (schema
and conversions), :mod:`.store` (the Milvus collection), :mod:`.push` (backlog and ledger). pymilvus is imported
only by :mod:`.store`, when it first connects.
"""
