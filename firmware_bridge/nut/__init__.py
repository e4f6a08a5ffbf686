"""UPS over NUT: the network protocol of ``upsd`` (sans-IO) and a polling driver.

``protocol`` is pure; ``driver.NutUps`` is the :class:`~firmware_bridge.watch.Device`;
``upsd.UpsDaemon`` runs a real upsd with simulated UPSes for tests and demos. Nothing is
imported here, so importing the protocol does not pull in the I/O of the driver.
"""
