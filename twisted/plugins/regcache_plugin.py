from twisted.application.service import ServiceMaker

regcache = ServiceMaker(
    "regcache", "regcache.tap", "A pull-through cache for OCI registries.", "regcache"
)
