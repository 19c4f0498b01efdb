"""Live localization: matching a query against the map, and the live map that records and queries it."""
