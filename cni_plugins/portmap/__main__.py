from cni_plugins.portmap import main

main()
