"""Applications: the command line (and the server). Only this layer parses arguments or draws progress bars."""
