"""The plugin's web pages, mounted under ``/bgremoval``: :mod:`.app` assembles one router per page
(:mod:`.clusters`, :mod:`.masks`, :mod:`.corrections`, :mod:`.reports`) sharing :mod:`.common`;
the HTML and JavaScript live in ``templates/``."""
