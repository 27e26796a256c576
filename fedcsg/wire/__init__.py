"""What travels in Flower's messages: the payload layout of a model (:mod:`.payload`), the uplink's
encoded updates (:mod:`.uplink`), the downlink's broadcasts (:mod:`.downlink`) and the message
schema both sides spell (:mod:`.messages`)."""
