from cni_plugins.loopback import main

main()
