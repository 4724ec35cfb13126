from twisted.application.service import ServiceMaker

im58d = ServiceMaker("im58d", "im58d.tap", "The im58d instant-messaging server.", "im58d")
