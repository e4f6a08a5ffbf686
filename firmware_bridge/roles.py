"""What a peripheral is for, in the words of the people who use the kiosk.

Roles are stable identifiers (they appear in config, in events and in the fleet's database);
titles are what village staff read, Chinese first.
"""

from __future__ import annotations

import enum
from typing import Final


class Role(enum.StrEnum):
    ID_CARD_READER = "id_card_reader"
    SOCIAL_SECURITY_CARD_READER = "social_security_card_reader"
    RECEIPT_PRINTER = "receipt_printer"
    A4_PRINTER = "a4_printer"
    DOCUMENT_CAMERA = "document_camera"
    FACE_CAMERA = "face_camera"
    QR_SCANNER = "qr_scanner"
    TOUCHSCREEN = "touchscreen"
    FINGERPRINT_READER = "fingerprint_reader"
    PIN_PAD = "pin_pad"
    DOOR_ACCESS_CONTROLLER = "door_access_controller"
    PICKUP_LOCKER = "pickup_locker"
    CONTROLLER_BOARD = "controller_board"
    UPS = "ups"

    @property
    def title_zh(self) -> str:
        return ROLE_TITLES[self][0]

    @property
    def title_en(self) -> str:
        return ROLE_TITLES[self][1]


ROLE_TITLES: Final[dict[Role, tuple[str, str]]] = {
    Role.ID_CARD_READER: ("身份证阅读器", "ID-card reader"),
    Role.SOCIAL_SECURITY_CARD_READER: ("社保卡读卡器", "Social security card reader"),
    Role.RECEIPT_PRINTER: ("凭条打印机", "Receipt printer"),
    Role.A4_PRINTER: ("A4 打印机", "A4 printer"),
    Role.DOCUMENT_CAMERA: ("高拍仪", "Document camera"),
    Role.FACE_CAMERA: ("人脸识别摄像头", "Face recognition camera"),
    Role.QR_SCANNER: ("扫码器", "QR code scanner"),
    Role.TOUCHSCREEN: ("触摸屏", "Touchscreen"),
    Role.FINGERPRINT_READER: ("指纹仪", "Fingerprint reader"),
    Role.PIN_PAD: ("密码键盘", "PIN pad"),
    Role.DOOR_ACCESS_CONTROLLER: ("门禁控制器", "Door access controller"),
    Role.PICKUP_LOCKER: ("智能取件柜", "Pickup locker"),
    Role.CONTROLLER_BOARD: ("控制板", "Controller board"),
    Role.UPS: ("不间断电源", "UPS"),
}
