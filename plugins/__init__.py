"""gatewayd's built-in routing plugins, installed as ``gatewayd_plugins``.

Each module is written against the public :mod:`gatewayd.plugin` API only and
registered through the ``gatewayd.plugins`` entry-point group, exactly like a
third-party plugin; each also exports ``plugin = ...`` so the folder works as a
plugin directory.
"""
