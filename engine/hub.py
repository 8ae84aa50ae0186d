"""Whether the Hugging Face hub can be reached: asked before timm or transformers try, since their hub client
retries for over a minute when the machine is offline."""
import os
import socket
from typing import Optional
from urllib.parse import urlparse


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached (its host name does not resolve), or None; None as well when
    the user asked for the local cache (``HF_HUB_OFFLINE=1``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false"):
        return None
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"
    return None
