// Starts a Nacos 3.x server in "merged" mode (server and console in one JVM)
// for the integration tests of nacos-replicator. The republished 3.x modules
// lack upstream's bootstrap module, so the test harness compiles this file
// with javac against the server's classpath and runs it instead.
//
// The shape follows what a 3.x server needs at start: one Spring context for
// the core beans, without a web server; then the server's web context (the
// HTTP API and gRPC) and the console's web context, both children of the core
// context. Each phase is announced to NacosStartUpManager first, because the
// server's run listeners pick what to prepare (work dirs, environment, logs)
// by the current phase, and the deployment type is recorded as upstream's
// bootstrap does (the harness also passes -Dnacos.deployment.type=merged).

import com.alibaba.nacos.NacosServerBasicApplication;
import com.alibaba.nacos.NacosServerWebApplication;
import com.alibaba.nacos.console.NacosConsole;
import com.alibaba.nacos.core.listener.startup.NacosStartUp;
import com.alibaba.nacos.core.listener.startup.NacosStartUpManager;
import com.alibaba.nacos.sys.env.DeploymentType;
import com.alibaba.nacos.sys.env.EnvUtil;
import org.springframework.boot.WebApplicationType;
import org.springframework.boot.builder.SpringApplicationBuilder;
import org.springframework.context.ConfigurableApplicationContext;

public final class NacosLauncher {
    private NacosLauncher() {
    }

    public static void main(String[] args) {
        // What upstream's bootstrap records before any context starts; the
        // console handlers and /v3/admin/core/state (the version) depend on it.
        EnvUtil.setDeploymentType(DeploymentType.MERGED);
        NacosStartUpManager.start(NacosStartUp.CORE_START_UP_PHASE);
        ConfigurableApplicationContext core = new SpringApplicationBuilder(NacosServerBasicApplication.class)
                .web(WebApplicationType.NONE)
                .run(args);

        NacosStartUpManager.start(NacosStartUp.WEB_START_UP_PHASE);
        new SpringApplicationBuilder(NacosServerWebApplication.class)
                .parent(core)
                .run(args);

        NacosStartUpManager.start(NacosStartUp.CONSOLE_START_UP_PHASE);
        new SpringApplicationBuilder(NacosConsole.class)
                .parent(core)
                .run(args);
    }
}
