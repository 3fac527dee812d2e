from cni_plugins.bridge import main

main()
