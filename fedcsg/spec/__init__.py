"""What a run is, before anything runs: its settings (:mod:`.config`), its arms (:mod:`.arms`) and
the update codecs (:mod:`.codecs`). Nothing here imports Flower or Ray, so on-device code and tools
load it cheaply (an import-linter contract in pyproject.toml holds that)."""
