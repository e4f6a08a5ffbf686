"""Device drivers for the kiosk's peripherals and controller board.

Sans-IO protocol cores plus thin async drivers; knows nothing of MQTT or the agent. The device
families (ESC/POS printers, Modbus relay boards, NUT UPS) arrive with their own issue.
"""
