"""The jobs users run, one module each: compress, apply/verify, info.

The modules are not re-exported here (a function named like its module would shadow it);
``deltastream.api`` is the public entry point.
"""
