"""meshpush benchmarks, run as ``meshpush bench <name> [args]`` (see bench/README.md).

Each public module ``bench/<name>.py`` is one benchmark exposing ``main(argv: list[str]) ->
int``; a dash in the command name maps to an underscore in the module name. Modules whose
name starts with ``_`` are helpers.
"""
