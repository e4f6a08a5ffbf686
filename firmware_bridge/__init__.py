"""Device drivers for the kiosk's peripherals and controller board; knows nothing of MQTT.

Each device family is a sans-IO protocol core (bytes in, typed status out; requests to bytes)
and a thin async driver over a byte stream (:mod:`firmware_bridge.link`: serial ports, ptys,
``socket://`` and TCP through pyserial-asyncio-fast or asyncio):

* ``escpos``  receipt / ticket printers: ``DLE EOT`` real-time status, tickets in GB18030;
* ``modbus``  the relay / IO controller board over Modbus RTU: power channels, inputs,
  register readings, power-cycles;
* ``nut``     the UPS through NUT's ``upsd``.

:mod:`~firmware_bridge.profiles` declares which devices a kiosk has (two profiles ship:
``comprehensive`` and ``zone24``), :class:`~firmware_bridge.kiosk.KioskDevices` builds and
watches them, :class:`~firmware_bridge.simulation.SimulatedKiosk` simulates them, and every
error is one of :mod:`firmware_bridge.errors`. ``kiosk-bridge`` is the installer's tool.
"""
