"""The kiosk's relay / IO controller board over Modbus RTU.

``protocol`` frames requests and checks replies (sans-IO), ``board`` is the board's
configuration and the meaning of what is read from it (pure), ``driver`` polls and switches a
real board through :mod:`firmware_bridge.link`, ``simulator`` stands in for one in tests.
"""
