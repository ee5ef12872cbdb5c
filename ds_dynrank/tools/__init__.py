"""Tools around runs, apart from the library: the command line and the allocation report."""
