"""Built kernels at run time: ``kernel`` (load a ``.so`` + manifest, call it on arrays), ``cache``
(build once per spec, reuse), ``api`` (``attention``), ``validate`` (argument checks)."""
