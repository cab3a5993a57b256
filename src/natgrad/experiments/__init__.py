"""The experiment tool (data, models, training loop, reporting, CLI).

Depends on the library; the library never imports from here.
"""
