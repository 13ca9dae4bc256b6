"""dora grid files (installed as ``ostinato.grids``): ``ostinato grid NAME`` == ``dora -P ostinato grid NAME``."""
