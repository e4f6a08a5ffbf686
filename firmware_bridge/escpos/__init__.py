"""ESC/POS receipt and ticket printers.

``protocol`` is the sans-IO core (status bytes, tickets), ``driver`` the async
:class:`~firmware_bridge.escpos.driver.EscPosPrinter`, ``simulator`` a simulated printer on a pty
or a loopback socket. Nothing is imported here, so the protocol module can be used without
pulling in asyncio or pyserial.
"""
