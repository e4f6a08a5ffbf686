"""The kiosk daemon: collectors, uplink to the fleet broker, and (later) the status page."""
